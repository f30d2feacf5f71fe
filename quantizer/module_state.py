"""State that modules keep outside their state_dict, saved and restored for exact reloads.

A state_dict holds parameters and buffers only. Some converted modules keep what they compute
with in plain attributes: torch.ao's quantized ``PReLU`` its quantized ``weight`` and output
``scale`` / ``zero_point``, ``ELU`` and ``Softmax`` their output ``scale`` / ``zero_point``,
``Sigmoid`` its ``output_scale`` / ``output_zero_point``, ``LinearLeakyReLU`` its
``negative_slope``; a rebuilt skeleton has placeholders there (scale 1.0, the factory's weight).
Rather than a list of classes that a torch upgrade can outgrow, this module keeps every public
plain attribute that holds a tensor, a number, a string, None, a torch dtype/qscheme/Size, or a
list/tuple/dict of those, per module, plus any GraphModule ``get_attr`` target held as such a
plain attribute; all of it loads with ``torch.load(weights_only=True)``. Private attributes are
left out on purpose (e.g. ``nn.LSTM._flat_weights`` aliases its parameters). Pure torch; it must
not import torch.ao, ray, click or ``jobs``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from quantizer.errors import ArtifactError

_SCALARS = (bool, int, float, str, type(None), torch.dtype, torch.qscheme, torch.Size)
_MODULE_INTERNALS = frozenset(vars(nn.Module()))     # training, _parameters, hooks, ...


def _storable(value: Any, depth: int = 0) -> bool:
    if isinstance(value, nn.Parameter) or depth > 4:
        return False
    if isinstance(value, (torch.Tensor, *_SCALARS)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_storable(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _storable(v, depth + 1) for k, v in value.items())
    return False


def _copied(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (list, tuple)) and not isinstance(value, torch.Size):
        return type(value)(_copied(v) for v in value)
    if isinstance(value, dict):
        return {k: _copied(v) for k, v in value.items()}
    return value


def _graph_attrs(module: nn.Module) -> set[str]:
    """Private names a GraphModule's code reads with ``get_attr`` straight off this module."""
    graph = getattr(module, "graph", None) if isinstance(module, torch.fx.GraphModule) else None
    return {node.target for node in (graph.nodes if graph is not None else ())
            if node.op == "get_attr" and "." not in node.target}


def extra_state(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{module path: {attribute: value}}`` of the state ``model`` keeps outside its state_dict.

    Returns:
        Copies (tensors cloned), safe to ``torch.save`` and load with ``weights_only=True``.
    """
    found: dict[str, dict[str, Any]] = {}
    for path, module in model.named_modules():
        wanted = _graph_attrs(module)
        attrs = {key: _copied(value) for key, value in vars(module).items()
                 if key not in _MODULE_INTERNALS and (not key.startswith("_") or key in wanted)
                 and _storable(value)}
        if attrs:
            found[path] = attrs
    return found


def restore_extra_state(model: nn.Module, state: dict[str, dict[str, Any]], name: str) -> None:
    """Set the attributes ``extra_state`` recorded onto a rebuilt ``model``, in place.

    Raises:
        ArtifactError: a recorded module is missing from ``model``, or a recorded attribute is
            a parameter, buffer or submodule there (the artifact does not fit this model).
    """
    for path, attrs in state.items():
        try:
            module = model.get_submodule(path)
        except AttributeError as exc:
            raise ArtifactError(f"{name}: the artifact keeps state of module {path!r}, which the "
                                f"rebuilt {type(model).__name__} lacks") from exc
        for key, value in attrs.items():
            if key in module._parameters or key in module._buffers or key in module._modules:
                raise ArtifactError(f"{name}: the artifact keeps {path or '<root>'}.{key} as a "
                                    f"plain attribute, but the rebuilt model holds a parameter, "
                                    f"buffer or submodule there")
            setattr(module, key, _copied(value))
