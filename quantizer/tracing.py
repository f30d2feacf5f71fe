"""Fixed non-tensor arguments of ``forward`` (``forward_kwargs``) for tracing and for every call.

Owns checking a ``forward_kwargs`` dict against a model's ``forward``, tracing a model with them
as torch.fx ``concrete_args`` (the traced graph still takes them by name), and telling whether
they are what keeps a model from tracing (CREPE's ``forward(x, embed=False)`` branches on
``embed``). Plain ``torch.fx`` only: its default leaf rule is the one torch.ao's quantization
tracer uses without skipped modules. Must not import torch.ao, ray, click or ``jobs``.
"""

from __future__ import annotations

import copy
import inspect
import json
import warnings
from typing import Any

import torch
from torch import nn

from quantizer.errors import ConfigError

JSON_SCALARS = (bool, int, float, str)


def check_forward_kwargs(model: nn.Module, forward_kwargs: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``forward_kwargs``, checked against ``type(model).forward``.

    Raises:
        ConfigError: a name ``forward`` does not take, or a value that is not a JSON scalar.
    """
    params = inspect.signature(type(model).forward).parameters
    open_ended = any(p.kind is p.VAR_KEYWORD for p in params.values())
    for key, value in forward_kwargs.items():
        if not open_ended and (key not in params or key == "self"):
            raise ConfigError(f"forward_kwargs {key!r}: {type(model).__name__}.forward has no such "
                              f"argument (it takes {', '.join(p for p in params if p != 'self')})")
        if value is not None and not isinstance(value, JSON_SCALARS):
            raise ConfigError(f"forward_kwargs {key!r}: {value!r} is a {type(value).__name__}; "
                              f"only JSON scalars (bool, number, string, null) are fixed values")
    return dict(forward_kwargs)


def trace_fixed(model: nn.Module, forward_kwargs: dict[str, Any]) -> torch.fx.GraphModule:
    """Trace ``model`` with ``forward_kwargs`` as FX ``concrete_args``, keeping their names.

    The traced forward still accepts each fixed argument under its own name (callers pass the
    same ``forward_kwargs`` to every model), defaults to the fixed value and asserts that it has it.

    Raises:
        Whatever ``torch.fx`` raises when the model cannot be traced.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*not able to add assertion")
        graph = torch.fx.Tracer().trace(model, concrete_args=forward_kwargs)
    for node in graph.nodes:
        if node.op == "placeholder" and node.target.endswith("_1") \
                and node.target[:-2] in forward_kwargs:
            node.target = node.target[:-2]      # FX calls it `embed_1`; callers pass `embed=`
            node.args = (forward_kwargs[node.target],)  # default: the fixed value, not forward's
    return torch.fx.GraphModule(model, graph, class_name=type(model).__name__)


def fixed_kwargs_advice(model: nn.Module, n_inputs: int, forward_kwargs: dict[str, Any]) -> str:
    """Advice naming ``forward_kwargs`` when fixing forward's scalar arguments makes ``model``
    traceable; "" when they are not the cause (or it has none).

    Args:
        model: the model that failed to trace.
        n_inputs: how many positional tensors it is called with.
        forward_kwargs: the values already fixed.
    """
    params = list(inspect.signature(type(model).forward).parameters.values())[1 + n_inputs:]
    defaults = {p.name: p.default for p in params if p.name not in forward_kwargs and (
        p.default is None or isinstance(p.default, JSON_SCALARS))}
    if not defaults:
        return ""
    try:
        trace_fixed(copy.deepcopy(model), {**forward_kwargs, **defaults})
    except Exception:  # noqa: BLE001  (fixing them does not help: the cause is elsewhere)
        return ""
    fixed = ", ".join(f"{key}: {json.dumps(value)}"
                      for key, value in {**forward_kwargs, **defaults}.items())
    return (f". The cause is forward's non-tensor argument(s) {', '.join(defaults)}: FX traces "
            f"them as symbols (it cannot branch on them or observe them). Give them fixed values with "
            f"`forward_kwargs: {{{fixed}}}` on this model in the zoo (forward_kwargs= in to_int8); "
            f"every call then passes these values")
