"""int8 Linear and convolution layers whose outputs stay float, swapped in after ``convert_fx``.

FX lowers every int8 Linear and convolution to a kernel that rounds its output to uint8; where
that output only feeds float ops (LayerNorm, GELU, softmax, a residual add, the logits), the next
op dequantizes it straight away and the rounding only adds error. torchao's pt2e graphs keep
those outputs float, and most of the fidelity it has over FX on attention models comes from that.

Owns ``FloatOutputLinear`` / ``FloatOutputConv`` and the passes ``lower_float_outputs`` and
``float_output_convs``, which ``quantizer.int8`` runs the same way when converting and when
rebuilding (so a saved state_dict loads into the same graph). Part of the int8 engine: with
``int8.py``, ``int8_qconfig.py`` and ``int8_lowering.py`` the only modules that touch torch.ao.
Must not import ray, click or jobs.
"""

from __future__ import annotations

import warnings

import torch
from torch import fx, nn

from quantizer.int8_lowering import attribute, drop_unused_attributes, is_quantize, is_shape_op

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from torch.ao.nn.intrinsic.quantized import ConvReLU2d as QuantizedConvReLU2d
    from torch.ao.nn.quantized import Conv2d as QuantizedConv2d
    from torch.ao.nn.quantized import Linear as QuantizedLinear


class FloatOutputLinear(nn.Module):
    """A static int8 Linear whose output stays float: the int32 sums of the int8 GEMM are scaled
    straight to float32 (fbgemm's ``linear_with_input_q_dq_qweight_dq_output_fp32``).

    Its input is either quantized (an int8 op's output: its own qparams are used) or float, which
    the kernel quantizes with ``input_scale`` and ``input_zero_point`` (the calibrated qparams of
    the quantize op it replaces). The state_dict holds those two and the packed weight and bias
    of the ``torch.ao`` Linear it replaces.
    """

    def __init__(self, linear: QuantizedLinear, input_scale: float = 1.0, input_zero_point: int = 0):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._packed_params = linear._packed_params
        self.register_buffer("input_scale", torch.tensor(input_scale, dtype=torch.float64))
        self.register_buffer("input_zero_point", torch.tensor(input_zero_point, dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_quantized:   # the kernel quantizes its float input again with the same qparams
            scale, zero_point, x = x.q_scale(), x.q_zero_point(), x.dequantize()
        else:
            scale, zero_point = float(self.input_scale), int(self.input_zero_point)
        return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            x, scale, zero_point, self._packed_params._packed_params)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, output=float32"


class FloatOutputConv(nn.Module):
    """An int8 convolution (its uint8 input, its int8 weights) computed in float32: the int8
    values dequantized, then ``conv2d``, as pt2e's q/dq graphs compute it. fbgemm has no int8
    convolution with a float output, and for the dense k x k convolutions this is used on (patch
    embeddings, stems, downsampling) float is about as fast at batch 1.

    The state_dict is the wrapped ``torch.ao`` convolution's (int8 weight, bias, output qparams);
    the dequantized weight is cached on first use, never saved, and dropped when weights load.
    """

    def __init__(self, conv: QuantizedConv2d):
        super().__init__()
        self.conv = conv
        self._weight_bias: tuple | None = None

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._weight_bias = None       # new weights are coming
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        if self._weight_bias is None or torch.jit.is_tracing():
            weight, bias = conv._weight_bias()         # unpacking costs: once
            self._weight_bias = (weight.dequantize(), bias)
        y = nn.functional.conv2d(x.dequantize(), *self._weight_bias, conv.stride, conv.padding,
                                 conv.dilation, conv.groups)
        return torch.relu(y) if isinstance(conv, QuantizedConvReLU2d) else y


def _dequantize_after(node: fx.Node, user: fx.Node) -> fx.Node | None:
    """The ``dequantize`` that ``node``'s output reaches through ``user`` and single-user shape
    ops, if that is all that path does."""
    current = node
    while True:
        if user.op == "call_method" and user.target == "dequantize":
            return user
        if not is_shape_op(user, current) or len(user.users) != 1:
            return None
        current, user = user, next(iter(user.users))


def _private_quantize(graph_module: fx.GraphModule, node: fx.Node) -> tuple | None:
    """(float input, scale, zero_point) when ``node`` reads a quantize op nothing else reads."""
    source = node.args[0]
    if not is_quantize(source) or len(source.users) != 1:
        return None
    x, scale, zero_point = source.args[:3]
    values = [attribute(graph_module, arg.target) if isinstance(arg, fx.Node) else arg
              for arg in (scale, zero_point)]
    return x, float(values[0]), int(values[1])


def _swap(graph_module: fx.GraphModule, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(graph_module.get_submodule(parent), name, module)


def lower_float_outputs(graph_module: fx.GraphModule) -> list[str]:
    """Swap every int8 Linear whose output is only dequantized for a ``FloatOutputLinear``.

    When nothing else reads the quantize op in front of it, that op goes too: the Linear takes
    the float tensor and quantizes it inside its kernel.

    Args:
        graph_module: a converted FX graph (fbgemm or x86 engine; qnnpack lacks the kernel).

    Returns:
        The names of the swapped modules, in graph order (the graph is modified in place).
    """
    graph, swapped = graph_module.graph, []
    for node in list(graph.nodes):
        if node.op != "call_module" or len(node.users) != 1 \
                or type(graph_module.get_submodule(node.target)) is not QuantizedLinear:
            continue
        dequantize = _dequantize_after(node, next(iter(node.users)))
        if dequantize is None:
            continue
        private = _private_quantize(graph_module, node)
        _swap(graph_module, node.target,
              FloatOutputLinear(graph_module.get_submodule(node.target), *(private or ())[1:]))
        if private:
            quantize = node.args[0]
            node.replace_input_with(quantize, private[0])
            graph.erase_node(quantize)
        dequantize.replace_all_uses_with(dequantize.args[0])
        graph.erase_node(dequantize)
        swapped.append(node.target)
    drop_unused_attributes(graph_module)
    return swapped


def _computes_well_in_float(conv: nn.Module) -> bool:
    # 1x1 and depthwise convolutions run 2-10x slower in float than fbgemm's int8 kernels at
    # batch 1 on this project's CPUs (docs/fidelity.md): they keep their uint8 outputs
    if type(conv) not in (QuantizedConv2d, QuantizedConvReLU2d):
        return False
    return not 1 < conv.groups == conv.in_channels and tuple(conv.kernel_size) != (1, 1)


def float_output_convs(graph_module: fx.GraphModule) -> list[str]:
    """Swap dense int8 convolutions whose output some float op reads for a ``FloatOutputConv``.

    Float ops get its float output; int8 ops that read it too get it quantized with the
    convolution's calibrated output qparams (root buffers, so the state_dict carries them).

    Returns:
        The names of the swapped modules, in graph order (the graph is modified in place).
    """
    graph, swapped = graph_module.graph, []
    for node in list(graph.nodes):
        if node.op != "call_module" or not _computes_well_in_float(graph_module.get_submodule(node.target)):
            continue
        paths = {user: _dequantize_after(node, user) for user in node.users}
        if not any(paths.values()):
            continue
        conv = graph_module.get_submodule(node.target)
        _swap(graph_module, node.target, FloatOutputConv(conv))
        int8_users = [user for user, dequantize in paths.items() if dequantize is None]
        if int8_users:
            _requantize(graph_module, node, conv, int8_users)
        for dequantize in filter(None, paths.values()):
            dequantize.replace_all_uses_with(dequantize.args[0])
            graph.erase_node(dequantize)
        swapped.append(node.target)
    graph_module.recompile()
    return swapped


def _requantize(graph_module: fx.GraphModule, node: fx.Node, conv: nn.Module,
                users: list[fx.Node]) -> None:
    graph, prefix = graph_module.graph, node.target.replace(".", "_")
    graph_module.register_buffer(f"{prefix}_output_scale", torch.tensor(float(conv.scale)))
    graph_module.register_buffer(f"{prefix}_output_zero_point", torch.tensor(int(conv.zero_point)))
    with graph.inserting_after(node):
        scale = graph.get_attr(f"{prefix}_output_scale")
    with graph.inserting_after(scale):
        zero_point = graph.get_attr(f"{prefix}_output_zero_point")
    with graph.inserting_after(zero_point):
        quantized = graph.call_function(torch.quantize_per_tensor,
                                        (node, scale, zero_point, torch.quint8))
    for user in users:
        user.replace_input_with(node, quantized)
