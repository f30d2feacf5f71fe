"""Packed quantized weights in a state_dict, as plain tensors and back.

FX lowers a functional ``F.linear`` / ``F.conv*d`` with weight parameters to a
``torch.ops.quantized`` call on a packed weight, and the converted graph module's state_dict
holds that packed weight as a torchbind ``ScriptObject`` (``_packed_weight_0``, ...), which
``torch.load(weights_only=True)`` refuses. ``unpack`` turns each into its quantized weight, bias
and convolution settings (tensors, ints, bools: weights_only-safe); ``repack`` builds the same
packed objects again with the ``torch.ops.quantized`` prepack ops. Only the packed classes and
state format versions known here are accepted; anything else is an ``ArtifactError``. It must
not import torch.ao.quantization, ray, click or ``jobs``.
"""

from __future__ import annotations

from typing import Any

import torch

from quantizer.errors import ArtifactError

_LINEAR = "LinearPackedParamsBase"
_CONV = ("Conv2dPackedParamsBase", "Conv3dPackedParamsBase")


def _conv_settings(params: torch.Tensor) -> dict[str, Any]:
    """Decode the settings tensor of a version-2 conv packed state:
    ``[dims, stride*dims, padding*dims, dilation*dims, output_padding*dims, groups, transpose]``."""
    values = [int(v) for v in params.tolist()]
    dims = values[0]
    if len(values) != 3 + 4 * dims:
        raise ValueError(f"conv settings of length {len(values)} for {dims} dims")
    part = [values[1 + i * dims: 1 + (i + 1) * dims] for i in range(4)]
    return {"dims": dims, "stride": part[0], "padding": part[1], "dilation": part[2],
            "output_padding": part[3], "groups": values[-2], "transpose": bool(values[-1])}


def _unpack_one(key: str, value: torch.ScriptObject) -> dict[str, Any]:
    try:
        state, qualified = value.__getstate__()
    except RuntimeError as exc:   # e.g. QNNPACK cannot unpack its 3-d convolutions
        raise ArtifactError(f"packed weight {key!r} cannot be unpacked to store it without "
                            f"pickling ({str(exc).splitlines()[0]}); keep that layer in float or "
                            f"use another backend") from exc
    kind = str(qualified).rsplit(".", 1)[-1]
    try:
        if kind == _LINEAR:
            weight, bias = state
            return {"kind": "linear", "weight": weight.detach(), "bias": _plain(bias)}
        if kind in _CONV and str(state[0]) == "2":
            _, (params, weight), optional = state
            return {"kind": "conv", "weight": weight.detach(),
                    "bias": _plain(optional[0] if optional else None), **_conv_settings(params)}
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"packed weight {key!r} ({kind}): state not understood: {exc}") from exc
    raise ArtifactError(f"packed weight {key!r} is a {kind} (state version "
                        f"{state[0] if isinstance(state, tuple) else '?'}), which this tool cannot "
                        f"store without pickling; keep that layer in float")


def _plain(bias: torch.Tensor | None) -> torch.Tensor | None:
    return None if bias is None else bias.detach().clone().requires_grad_(False)


def unpack(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Split ``state`` into its weights_only-safe entries and its packed weights, unpacked.

    Returns:
        ``(state without packed entries (keeping ``_metadata``), {key: unpacked})``.

    Raises:
        ArtifactError: a packed class or state format this module does not know.
    """
    packed = {k: _unpack_one(k, v) for k, v in state.items() if isinstance(v, torch.ScriptObject)}
    rest = type(state)((k, v) for k, v in state.items() if k not in packed)
    if hasattr(state, "_metadata"):
        rest._metadata = state._metadata
    return rest, packed


def _repack_one(entry: dict[str, Any]) -> torch.ScriptObject:
    ops = torch.ops.quantized
    if entry["kind"] == "linear":
        return ops.linear_prepack(entry["weight"], entry["bias"])
    dims, common = entry["dims"], (entry["weight"], entry["bias"], entry["stride"], entry["padding"])
    if entry["transpose"]:
        prepack = {2: ops.conv_transpose2d_prepack, 3: ops.conv_transpose3d_prepack}[dims]
        return prepack(*common, entry["output_padding"], entry["dilation"], entry["groups"])
    prepack = {2: ops.conv2d_prepack, 3: ops.conv3d_prepack}[dims]
    return prepack(*common, entry["dilation"], entry["groups"])


def repack(packed: dict[str, dict[str, Any]], name: str) -> dict[str, torch.ScriptObject]:
    """The packed weights ``unpack`` took apart, built again (needs the artifact's engine set).

    Raises:
        ArtifactError: an entry this tool cannot rebuild.
    """
    try:
        return {key: _repack_one(entry) for key, entry in packed.items()}
    except (KeyError, RuntimeError, TypeError) as exc:
        raise ArtifactError(f"{name}: cannot rebuild the packed weights: "
                            f"{type(exc).__name__}: {exc}") from exc
