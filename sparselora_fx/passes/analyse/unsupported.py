"""Layers we must not sparsify, found and reported: QLoRA (quantized base weights) and DoRA.

Why apart from ``units``: these are not units of ours (the gather ops need a float weight, and
DoRA rescales the output by a norm over every channel); this module only finds them so that the
report names each one and its reason, instead of the layer silently running dense.
"""

from __future__ import annotations

import logging
from typing import Iterator

import torch
from torch.fx import GraphModule, Node

from ...names import module_of_param
from .. import graph_ops as ops
from .units import Scope, _is_weight, _match_branch, iter_scopes, weight_path

log = logging.getLogger("sparselora_fx")


# ---- layers we must not sparsify: QLoRA (quantized base weights) and DoRA ------------------------

QLORA_REASON = ("QLoRA: the frozen base weight is quantized ({what}); the channel-gather ops need a "
                "floating-point weight, so this layer runs dense (its LoRA branch trains as usual)")
DORA_REASON = ("DoRA (PEFT use_dora=True, lora_magnitude_vector): the output is rescaled by "
               "magnitude / ||W + s*B@A|| over the full weight, so dropping channels would change "
               "the adapter itself; this layer runs dense. Use plain LoRA (use_dora=False) to sparsify it")
_DORA_LOCAL = (" (a graph break inside PEFT's DoRA layer hides its module path here; "
               "sparselora_fx.integrations.transformers.unsupported_modules(model) lists these layers by name)")


def _is_quant_op(node: Node) -> bool:
    """A call into bitsandbytes (its torch.ops namespace or its Python functions)."""
    if node.op != "call_function":
        return False
    target = node.target
    if getattr(target, "namespace", None) == "bitsandbytes":  # OpOverload / OpOverloadPacket
        return True
    return str(getattr(target, "__module__", "") or "").startswith("bitsandbytes")


def _quantized_source(scope: Scope, node: object, depth: int = 4) -> Node | None:
    """A non-floating-point graph input (a packed 4/8-bit weight) feeding ``node`` within ``depth`` ops."""
    frontier, seen = [node], set()
    for _ in range(depth + 1):
        nxt: list[object] = []
        for cur in frontier:
            if not isinstance(cur, Node) or cur in seen:
                continue
            seen.add(cur)
            if cur.op in ("placeholder", "get_attr"):
                val = ops.example_value(cur)
                if val is None:
                    val = ops.example_value(scope.resolve(cur))
                if isinstance(val, torch.Tensor) and val.dim() >= 1 and not val.is_floating_point():
                    return cur
                continue
            nxt.extend(a for a in cur.all_input_nodes)
        frontier = nxt
    return None


def _output_has_lora(scope: Scope, out: Node, x: object) -> bool:
    """``out`` (through dtype casts) is summed with a LoRA branch on ``x``."""
    inputs = [x]
    if isinstance(x, Node) and ops.is_dtype_cast(x):
        inputs.append(ops.strip_passthrough(x))
    cur = out
    while True:
        users = list(cur.users)
        if len(users) != 1:
            return False
        user = users[0]
        if ops.is_dtype_cast(user):
            cur = user
            continue
        if not ops.is_add(user):
            return False
        other = user.args[1] if user.args[0] is cur else user.args[0]
        return any(isinstance(i, Node) and _match_branch(scope, other, i) is not None for i in inputs)


def _path_name(scope: Scope, node: Node) -> str:
    """The module path of a (packed) weight; bitsandbytes' ``weight.quant_state.*`` inputs name their weight's module."""
    path = weight_path(scope, node)
    if ".weight." in f"{path}.":
        path = path[: f"{path}.".index(".weight.")] + ".weight"
    return module_of_param(path) or path or node.name


def _qlora_layers(scope: Scope) -> Iterator[tuple[str, str]]:
    for node in scope.gm.graph.nodes:
        if _is_quant_op(node):
            x = next((a for a in node.args if isinstance(a, Node)), None)
            packed = _quantized_source(scope, node)
            what = f"bitsandbytes op {getattr(node.target, '__name__', node.target)}"
        else:
            call = ops.as_linear(node)
            if call is None or _is_weight(scope, call.weight, trainable=False):
                continue
            x, packed = call.input, _quantized_source(scope, call.weight)
            if packed is None:
                continue
            what = f"{ops.example_value(packed).dtype} weight dequantized in the graph"
        if x is None or not _output_has_lora(scope, node, x):
            continue
        name = _path_name(scope, packed) if packed is not None else f"{scope.name}{node.name}"
        yield name, QLORA_REASON.format(what=what)


def _same_values(node: Node) -> bool:
    """``detach``, a view, ``unsqueeze``, ``contiguous``: the input's values, perhaps in another shape."""
    return (ops.is_call(node, ops.DETACH_FNS, ops.DETACH_METHODS) or ops.is_call(node, methods=ops.VIEW_METHODS)
            or ops.is_call(node, methods=ops.UNSQUEEZE_METHODS) or ops.is_call(node, methods=ops.CONTIGUOUS_METHODS))


def _is_norm(node: object) -> bool:
    """A norm, possibly behind ``detach``/views/casts (PEFT detaches DoRA's weight norm)."""
    while isinstance(node, Node) and (_same_values(node) or ops.is_dtype_cast(node)):
        node = node.args[0]
    return ops.is_call(node, ops.VECTOR_NORM_FNS, ops.VECTOR_NORM_METHODS)


def _dora_layers(scope: Scope) -> Iterator[tuple[str, str]]:
    """DoRA magnitudes: a source path through ``lora_magnitude_vector``, or a trainable 1-D input divided by a norm."""
    for node in scope.gm.graph.nodes:
        if node.op not in ("placeholder", "get_attr"):
            continue
        path = weight_path(scope, node)
        by_name = "lora_magnitude_vector" in path
        val = ops.example_value(node)
        by_shape = False
        if isinstance(val, torch.Tensor) and val.dim() == 1 and val.requires_grad:
            by_shape = any(ops.is_call(u, ops.DIV_FNS, ops.DIV_METHODS) and u.args[0] is node and _is_norm(u.args[1])
                           for u in node.users)
        if not (by_name or by_shape):
            continue
        if by_name:
            yield module_of_param(path), DORA_REASON
        else:  # a graph break inside PEFT's DoRA layer: only the frame-local name is left
            yield f"<DoRA layer, graph input {path or node.name!r}>", DORA_REASON + _DORA_LOCAL


def detect_unsupported(gm: GraphModule) -> list[tuple[str, str]]:
    """LoRA layers in ``gm`` (and its HOP bodies) that must stay dense, as ``(name, reason)``.

    Why: a QLoRA base (4/8-bit packed weight, bitsandbytes matmul or an in-graph dequantize) has
    no float weight to gather channels from, and DoRA rescales by a norm over the whole adapted
    weight; neither may be sparsified, and a user must see why in the report's ``skipped`` rather
    than find them silently dense. Names are module paths where the graph still knows them.
    """
    found: list[tuple[str, str]] = []
    seen: set[str] = set()
    for scope in iter_scopes(gm):
        for name, reason in [*_qlora_layers(scope), *_dora_layers(scope)]:
            if name not in seen:
                seen.add(name)
                found.append((name, reason))
    if found:
        log.debug("units: %d layers must stay dense (QLoRA/DoRA)", len(found))
    return found
