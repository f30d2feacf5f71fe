"""Passes over FX's converted int8 graph, for what its lowering to fbgemm kernels does not do.

Owns the passes ``dequantize_float_inputs``, ``float_layer_norms``, ``int8_adds`` and
``drop_float_roundtrips``
(and the graph helpers ``int8_float_outputs`` shares); only
``quantizer.int8`` calls them, after ``convert_fx``, the same way when converting and when
rebuilding (so a saved state_dict loads into the same graph). Part of the int8 engine: with
``int8.py`` the only modules that touch ``torch.ao``. Must not import ray, click or jobs.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Collection
from typing import Any

import torch
from torch import fx, nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from torch.ao.nn.quantized import LayerNorm as QuantizedLayerNorm

# ops that only view or reshape data: a float output may take them before its dequantize
SHAPE_METHODS = frozenset({"reshape", "view", "permute", "transpose", "flatten", "contiguous",
                            "squeeze", "unsqueeze", "unflatten"})
SHAPE_FUNCTIONS = frozenset({torch.flatten, torch.reshape, torch.permute, torch.transpose,
                              torch.squeeze, torch.unsqueeze})


def is_shape_op(node: fx.Node, source: fx.Node) -> bool:
    """``node`` views or reshapes ``source`` (its first argument), nothing else."""
    if not node.args or node.args[0] is not source:
        return False
    return ((node.op == "call_method" and node.target in SHAPE_METHODS)
            or (node.op == "call_function" and node.target in SHAPE_FUNCTIONS))


def drop_unused_attributes(graph_module: fx.GraphModule) -> None:
    """Dead get_attr nodes out of the graph, and the tensors they read out of the state_dict."""
    graph = graph_module.graph
    before = {n.target for n in graph.nodes if n.op == "get_attr"}
    graph.eliminate_dead_code()
    after = {n.target for n in graph.nodes if n.op == "get_attr"}
    for target in before - after:
        parent, _, name = target.rpartition(".")
        owner = graph_module.get_submodule(parent)
        if name in owner._buffers or name in owner._parameters or isinstance(
                getattr(owner, name, None), torch.Tensor):
            delattr(owner, name)
    graph_module.recompile()


def attribute(graph_module: fx.GraphModule, target: str) -> Any:
    parent, _, name = target.rpartition(".")
    return getattr(graph_module.get_submodule(parent), name)


def _layer_norm_parts(graph_module: fx.GraphModule, node: fx.Node) -> tuple | None:
    """(input, call, call args, scale, zero_point) that compute an int8 LayerNorm node in float:
    ``F.layer_norm`` for the functional op, a float ``nn.LayerNorm`` swapped in for the module
    (its output qparams move to the root, so the state_dict keeps them)."""
    graph = graph_module.graph
    if node.op == "call_function" and node.target is torch.ops.quantized.layer_norm:
        kw = node.kwargs
        args = (tuple(node.args[1]), kw.get("weight"), kw.get("bias"), kw.get("eps", 1e-5))
        return (node.args[0], ("call_function", nn.functional.layer_norm), args,
                kw["output_scale"], kw["output_zero_point"])
    if node.op != "call_module" or type(graph_module.get_submodule(node.target)) is not QuantizedLayerNorm:
        return None
    quantized = graph_module.get_submodule(node.target)
    layer_norm = nn.LayerNorm(quantized.normalized_shape, quantized.eps, quantized.elementwise_affine)
    layer_norm.weight, layer_norm.bias = quantized.weight, quantized.bias
    parent, _, name = node.target.rpartition(".")
    setattr(graph_module.get_submodule(parent), name, layer_norm)
    prefix = node.target.replace(".", "_")
    qparams = []
    for suffix, value in (("output_scale", quantized.scale), ("output_zero_point", quantized.zero_point)):
        graph_module.register_buffer(f"{prefix}_{suffix}", value.clone())
        with graph.inserting_before(node):
            qparams.append(graph.get_attr(f"{prefix}_{suffix}"))
    return (node.args[0], ("call_module", node.target), (), *qparams)


def float_layer_norms(graph_module: fx.GraphModule) -> int:
    """Run in float the LayerNorms FX's lowering turned into int8 ones although set to float.

    ``special_pattern_replacement`` makes ``dequantize -> LayerNorm -> quantize`` one int8
    LayerNorm whatever its qconfig, and that pins a quantize on its input: the residual stream of
    a patch-merging or downsampling block, which pt2e keeps float. This pass gives such a
    LayerNorm back its float input (``drop_float_roundtrips`` then removes what fed it, where no
    int8 op needs it); its output is quantized as before, for the int8 op that reads it. A
    ``torch.ao`` LayerNorm module becomes a float one with the same weights, its output scale and
    zero point root buffers.

    Returns:
        How many LayerNorms now run in float.
    """
    graph, count = graph_module.graph, 0
    for node in list(graph.nodes):
        parts = _layer_norm_parts(graph_module, node)
        if parts is None:
            continue
        source, (op, target), args, scale, zero_point = parts
        with graph.inserting_before(node):
            x = graph.call_method("dequantize", (source,))
            y = graph.create_node(op, target, (x, *args))
            q = graph.call_function(torch.quantize_per_tensor, (y, scale, zero_point, torch.quint8))
        node.replace_all_uses_with(q)
        graph.erase_node(node)
        count += 1
    drop_unused_attributes(graph_module)
    return count


def _is_relu(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        return type(modules[node.target]) is nn.ReLU
    return (node.op == "call_function" and node.target in (torch.relu, nn.functional.relu)) \
        or (node.op == "call_method" and node.target == "relu")


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def int8_adds(graph_module: fx.GraphModule) -> int:
    """Turn ``dequantize(a) + dequantize(b)``, with an optional ReLU, that is quantized straight
    after back into one int8 add (``quantized::add`` / ``add_relu``).

    Version 2 keeps adds in float for a transformer's residual stream; between two int8 tensors
    whose sum is quantized again (a ResNet or MobileNet block) the float add only costs time: the
    int8 kernel rounds once, at the same place.

    Returns:
        How many adds became int8.
    """
    graph, modules, count = graph_module.graph, dict(graph_module.named_modules()), 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (operator.add, torch.add) \
                or len(node.args) != 2 or node.kwargs or not all(
                    isinstance(a, fx.Node) and is_dequantize(a) for a in node.args):
            continue
        relu = _only_user(node)
        relu = relu if relu is not None and _is_relu(relu, modules) else None
        quantize = _only_user(relu or node)
        if quantize is None or not is_quantize(quantize) or quantize.args[0] is not (relu or node):
            continue
        kernel = torch.ops.quantized.add_relu if relu else torch.ops.quantized.add
        with graph.inserting_before(quantize):
            fused = graph.call_function(kernel, (node.args[0].args[0], node.args[1].args[0],
                                                 *quantize.args[1:3]))
        quantize.replace_all_uses_with(fused)
        for dead in (quantize, relu, node, *node.args):
            if dead is not None and not dead.users:
                graph.erase_node(dead)
        count += 1
    graph_module.recompile()
    return count


def is_quantize(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch.quantize_per_tensor


def is_dequantize(node: fx.Node) -> bool:
    return node.op == "call_method" and node.target == "dequantize"


def _moves_data(node: fx.Node) -> bool:
    """Ops that give the same values, moved: a quantize before them commutes with them."""
    if node.op == "call_method":
        return node.target in SHAPE_METHODS or node.target == "expand"
    return node.op == "call_function" and (
        node.target in SHAPE_FUNCTIONS or node.target in (operator.getitem, torch.cat))


def _reads_metadata(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in ("size", "dim")
    return node.op == "call_function" and node.target is getattr and node.args[1] in ("shape", "ndim")


def _moved(node: fx.Node) -> list[fx.Node]:
    """The tensors a data-moving op moves (not the sizes or indices it is given)."""
    data = node.args[0]
    return [n for n in (data if isinstance(data, (list, tuple)) else [data]) if isinstance(n, fx.Node)]


def _float_region(quantize: fx.Node) -> tuple[set, set] | None:
    """The quantize nodes and dequantize nodes of the region ``quantize`` opens, if every path
    from it reaches a dequantize through data-moving ops fed by quantize nodes alone."""
    quantizes, dequantizes, seen, frontier = {quantize}, set(), {quantize}, [quantize]
    while frontier:
        for user in frontier.pop().users:
            if user in seen:
                continue
            seen.add(user)
            if is_dequantize(user):
                dequantizes.add(user)
                continue
            if _reads_metadata(user):
                continue                     # x.shape, x.size(): the same on a float tensor
            if not _moves_data(user):
                return None                  # an int8 op reads it: this quantize is needed
            for arg in _moved(user):
                if arg not in seen and not is_quantize(arg):
                    return None              # mixed with an int8 op's output
                if arg not in seen:
                    quantizes.add(arg)
                    seen.add(arg)
                    frontier.append(arg)
            frontier.append(user)
    return quantizes, dequantizes


def drop_float_roundtrips(graph_module: fx.GraphModule) -> int:
    """Remove quantize ... dequantize round trips that no int8 op reads in between.

    FX quantizes the input of every view, permute, reshape, getitem or cat it may run in int8,
    even where the tensor only moves between float ops (a transformer's q and k heading for a
    float matmul, a relative position bias, a class token): each such round trip only adds
    rounding. pt2e quantizes them only next to int8 ops; so does this pass, once converted.

    Args:
        graph_module: a converted FX graph (modified in place).

    Returns:
        How many quantize nodes were removed.
    """
    removed: set[fx.Node] = set()
    for node in list(graph_module.graph.nodes):
        if node in removed or not is_quantize(node):
            continue
        region = _float_region(node)
        if region is None:
            continue
        for quantize in region[0]:
            quantize.replace_all_uses_with(quantize.args[0])
        for dequantize in region[1]:
            dequantize.replace_all_uses_with(dequantize.args[0])
        for dead in (*region[1], *region[0]):
            graph_module.graph.erase_node(dead)
        removed |= region[0]
    drop_unused_attributes(graph_module)
    return len(removed)


def _is_float_op(node: fx.Node, modules: dict, float_ops: Collection[Any]) -> bool:
    if node.op == "call_module":
        return type(modules[node.target]) in float_ops
    if node.op in ("call_function", "call_method"):
        return any(node.target is op or node.target == op for op in float_ops
                   if isinstance(op, str) == (node.op == "call_method"))
    return False


def dequantize_float_inputs(graph_module: fx.GraphModule, example: tuple,
                            float_ops: Collection[Any]) -> int:
    """Put back the ``dequantize`` FX's lowering dropped in front of ops kept in float.

    ``special_pattern_replacement`` in torch.ao's FX lowering turns ``dequantize -> LayerNorm ->
    quantize`` into a quantized LayerNorm even for a LayerNorm configured to stay float, and when
    that LayerNorm's output has other users too it removes the ``dequantize`` but leaves the float
    module reading a quantized tensor. One run on ``example`` finds every op of ``float_ops``
    that receives a quantized tensor; a ``dequantize`` is inserted before each. Except where FX
    meant it: an op that shares its input's qparams (``x.mean`` of an int8 conv's output, in a
    CNN's global pooling) runs in int8 and int8 ops read its output as it is, with no quantize
    between; such an op, whose int8 output an op other than ``dequantize`` reads, stays int8.

    Args:
        graph_module: a converted FX graph (modified in place).
        example: positional inputs to run it with once.
        float_ops: module types, functions and method names meant to run in float.

    Returns:
        How many ``dequantize`` nodes were inserted.
    """
    modules = dict(graph_module.named_modules())
    fixes: list[tuple[fx.Node, fx.Node]] = []

    class _Probe(fx.Interpreter):
        def run_node(self, node: fx.Node) -> Any:
            if not _is_float_op(node, modules, float_ops):
                return super().run_node(node)
            kept = _int8_output_read_as_is(self, node)
            if kept is not None:
                return kept
            for arg in node.all_input_nodes:
                value = self.env[arg]
                if isinstance(value, torch.Tensor) and value.is_quantized:
                    fixes.append((node, arg))
            args, kwargs = self.fetch_args_kwargs_from_env(node)
            args, kwargs = fx.node.map_aggregate((args, kwargs), _dequantized)
            return getattr(self, node.op)(node.target, args, kwargs)

    with torch.no_grad(), warnings.catch_warnings():
        # e.g. an int8 cat of inputs with different scales, which later passes make float
        warnings.simplefilter("ignore", UserWarning)
        _Probe(graph_module).run(*example)
    for node, arg in fixes:
        with graph_module.graph.inserting_before(node):
            node.replace_input_with(arg, graph_module.graph.call_method("dequantize", (arg,)))
    graph_module.recompile()
    return len(fixes)


def _int8_output_read_as_is(probe: fx.Interpreter, node: fx.Node) -> torch.Tensor | None:
    """``node``'s output run as FX built it, if that is a quantized tensor that an op other than
    ``dequantize`` reads; None otherwise (the op fails or gives float on int8 inputs)."""
    if all(is_dequantize(user) for user in node.users):
        return None
    try:
        out = fx.Interpreter.run_node(probe, node)
    except (RuntimeError, NotImplementedError, TypeError):
        return None
    return out if isinstance(out, torch.Tensor) and out.is_quantized else None


def _dequantized(value: Any) -> Any:
    return value.dequantize() if isinstance(value, torch.Tensor) and value.is_quantized else value
