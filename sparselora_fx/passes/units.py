"""Find linear+LoRA units: a frozen base linear whose output is summed with ``s * B(A(drop(x)))``.

This is the first pass. It works on the Dynamo graph (torch-level ops, before autograd), recurses
into higher-order-op bodies (activation checkpointing's ``wrap_body_*``), and names each unit by
the module path a user sees (``model.layers.3.mlp.gate_proj``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch.fx import GraphModule, Node

from .._compat import dynamo_source_name
from ..names import module_of_param, source_to_path
from . import graph_ops as ops

log = logging.getLogger("sparselora_fx")


@dataclass
class Scope:
    """A graph plus how its placeholders map to the enclosing graph (for HOP bodies)."""

    gm: GraphModule
    name: str = ""
    parent: "Scope | None" = None
    outer_args: dict[Node, object] = field(default_factory=dict)

    def resolve(self, node: object) -> object:
        """Follow a placeholder out to the outermost graph node that feeds it."""
        scope: Scope | None = self
        while isinstance(node, Node) and node.op == "placeholder" and scope is not None and node in scope.outer_args:
            node = scope.outer_args[node]
            scope = scope.parent
        return node


@dataclass
class LoraBranch:
    """One adapter's ``scale * B(A(dropout(x)))`` on the unit's input."""

    a: ops.LinearCall
    b: ops.LinearCall
    scale: float | None  # None when the scale is a graph value (a float input under dynamic=True)
    scale_node: Node | None
    dropout: Node | None
    output: Node  # the node summed into the base output

    @property
    def rank(self) -> int:
        return int(ops.example_value(self.a.node).shape[-1])


@dataclass
class LoraUnit:
    """A frozen linear plus its LoRA branches, as found in one graph scope."""

    fqn: str
    scope: Scope
    base: ops.LinearCall
    input: Node
    branches: list[LoraBranch]
    adds: list[Node]
    output: Node
    in_features: int
    out_features: int
    role: str = ""

    @property
    def weight(self) -> Node:
        return self.base.weight

    @property
    def bias(self) -> Node | None:
        return self.base.bias

    @property
    def graph_module(self) -> GraphModule:
        return self.scope.gm

    @property
    def lora_rank(self) -> int:
        return sum(b.rank for b in self.branches)


def iter_scopes(gm: GraphModule) -> Iterator[Scope]:
    """The top graph and, recursively, each higher-order-op body it calls."""
    root = Scope(gm)
    stack = [root]
    while stack:
        scope = stack.pop(0)
        yield scope
        for node in scope.gm.graph.nodes:
            if node.op != "call_function" or not node.args:
                continue
            body = node.args[0]
            if not (isinstance(body, Node) and body.op == "get_attr"):
                continue
            sub = getattr(scope.gm, body.target, None)
            if not isinstance(sub, GraphModule):
                continue
            placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
            operands = list(node.args[1:])
            if len(operands) != len(placeholders):
                log.debug("higher-order op %s: %d operands for %d placeholders; not entered",
                          node.name, len(operands), len(placeholders))
                continue
            stack.append(Scope(sub, f"{scope.name}{body.target}.", scope, dict(zip(placeholders, operands))))


def _is_weight(scope: Scope, node: object, trainable: bool) -> bool:
    """A 2-D graph input (a parameter) whose requires_grad matches ``trainable``."""
    outer = scope.resolve(node)
    if not isinstance(outer, Node) or outer.op not in ("placeholder", "get_attr"):
        return False
    val = ops.example_value(node)
    if val is None:
        val = ops.example_value(outer)
    return isinstance(val, torch.Tensor) and val.dim() == 2 and bool(val.requires_grad) == trainable


def weight_path(scope: Scope, weight: Node) -> str:
    """The parameter's path in the user's model (``model.layers.0.q_proj.base_layer.weight``)."""
    outer = scope.resolve(weight)
    if isinstance(outer, Node):
        source = dynamo_source_name(outer) if outer.op == "placeholder" else None
        if source:
            path = source_to_path(source)
            if path:
                return path
        if outer.op == "get_attr":
            return str(outer.target)
        return outer.name
    return weight.name


def _linear_features(call: ops.LinearCall) -> tuple[int, int]:
    w = ops.example_value(call.weight)
    out_f, in_f = (w.shape[1], w.shape[0]) if call.weight_transposed else (w.shape[0], w.shape[1])
    return int(in_f), int(out_f)


def _scale_value(value: object) -> float | None:
    return float(value) if ops.is_scalar(value) else None


def _match_branch(scope: Scope, node: object, x: Node) -> LoraBranch | None:
    """``node`` as ``scale * B(A(dropout(x)))`` on the same input ``x`` (scale on either side or absent)."""
    if not isinstance(node, Node):
        return None
    scale: float | None = 1.0
    scale_node, inner = None, node
    if ops.is_mul(node):
        lhs, rhs = node.args
        if ops.is_scalar_like(lhs) and not ops.is_scalar_like(rhs) and isinstance(rhs, Node):
            scale, scale_node, inner = _scale_value(lhs), node, rhs
        elif ops.is_scalar_like(rhs) and not ops.is_scalar_like(lhs) and isinstance(lhs, Node):
            scale, scale_node, inner = _scale_value(rhs), node, lhs
        else:
            return None
    b = ops.as_linear(ops.strip_passthrough(inner))
    if b is None or b.bias is not None or not _is_weight(scope, b.weight, trainable=True):
        return None
    a_out = b.input
    if ops.is_mul(a_out) and scale_node is None:  # scale between A and B
        lhs, rhs = a_out.args
        if ops.is_scalar_like(rhs) and isinstance(lhs, Node) and not ops.is_scalar_like(lhs):
            scale, scale_node, a_out = _scale_value(rhs), a_out, lhs
        elif ops.is_scalar_like(lhs) and isinstance(rhs, Node) and not ops.is_scalar_like(rhs):
            scale, scale_node, a_out = _scale_value(lhs), a_out, rhs
    a = ops.as_linear(ops.strip_passthrough(a_out))
    if a is None or a.bias is not None or not _is_weight(scope, a.weight, trainable=True):
        return None
    dropout = None
    cur = a.input
    while isinstance(cur, Node) and cur is not x and (ops.is_dtype_cast(cur) or ops.is_dropout(cur)):
        if ops.is_dropout(cur):
            dropout = cur
        cur = cur.args[0]
    if cur is not x:
        return None
    return LoraBranch(a=a, b=b, scale=scale, scale_node=scale_node, dropout=dropout, output=node)


def _match_unit(scope: Scope, call: ops.LinearCall) -> LoraUnit | None:
    if not _is_weight(scope, call.weight, trainable=False):
        return None
    if call.bias is not None and not _is_weight_like_frozen(scope, call.bias):
        return None
    x = ops.strip_passthrough(call.input) if ops.is_dtype_cast(call.input) else call.input
    branches: list[LoraBranch] = []
    adds: list[Node] = []
    cur: Node = call.node
    output = cur
    while True:
        users = list(cur.users)
        if len(users) != 1:
            break
        user = users[0]
        if ops.is_dtype_cast(user):
            cur = user
            continue
        if not ops.is_add(user):
            break
        other = user.args[1] if user.args[0] is cur else user.args[0]
        branch = _match_branch(scope, other, x) or (
            _match_branch(scope, other, call.input) if x is not call.input else None
        )
        if branch is None:
            break
        branches.append(branch)
        adds.append(user)
        cur = user
        output = cur
    if not branches:
        return None
    # trailing casts after the last add belong to the unit
    while len(output.users) == 1 and ops.is_dtype_cast(next(iter(output.users))):
        output = next(iter(output.users))
    in_f, out_f = _linear_features(call)
    fqn = module_of_param(weight_path(scope, call.weight))
    return LoraUnit(fqn=fqn, scope=scope, base=call, input=x, branches=branches, adds=adds,
                    output=output, in_features=in_f, out_features=out_f)


def _is_weight_like_frozen(scope: Scope, node: Node) -> bool:
    outer = scope.resolve(node)
    val = ops.example_value(node)
    return (isinstance(outer, Node) and outer.op in ("placeholder", "get_attr")
            and isinstance(val, torch.Tensor) and not val.requires_grad)


def find_lora_units(gm: GraphModule) -> list[LoraUnit]:
    """Every linear+LoRA unit in ``gm`` and the HOP bodies it calls, in graph order."""
    units: list[LoraUnit] = []
    for scope in iter_scopes(gm):
        for node in scope.gm.graph.nodes:
            call = ops.as_linear(node)
            if call is None:
                continue
            unit = _match_unit(scope, call)
            if unit is not None:
                units.append(unit)
    _dedupe_names(units)
    log.debug("units: matched %d linear+LoRA units", len(units))
    return units


def _dedupe_names(units: list[LoraUnit]) -> None:
    """Two units with one module path (a module called twice) get ``#1``, ``#2`` suffixes."""
    seen: dict[str, int] = {}
    for unit in units:
        seen[unit.fqn] = seen.get(unit.fqn, 0) + 1
    counts: dict[str, int] = {}
    for unit in units:
        if seen[unit.fqn] > 1:
            counts[unit.fqn] = counts.get(unit.fqn, 0) + 1
            unit.fqn = f"{unit.fqn}#{counts[unit.fqn]}"


# ---- layers we must not sparsify: QLoRA (quantized base weights) and DoRA ------------------------

QLORA_REASON = ("QLoRA: the frozen base weight is quantized ({what}); the channel-gather ops need a "
                "floating-point weight, so this layer runs dense (its LoRA branch trains as usual)")
DORA_REASON = ("DoRA (PEFT use_dora=True, lora_magnitude_vector): the output is rescaled by "
               "magnitude / ||W + s*B@A|| over the full weight, so dropping channels would change "
               "the adapter itself; this layer runs dense. Use plain LoRA (use_dora=False) to sparsify it")
_DORA_LOCAL = (" (a graph break inside PEFT's DoRA layer hides its module path here; "
               "sparselora_fx.integrations.transformers.unsupported_modules(model) lists these layers by name)")
_NORM_FNS = {torch.norm, torch.linalg.norm, torch.linalg.vector_norm, torch.Tensor.norm}
_NORM_METHODS = {"norm"}
_DIV_FNS = {torch.div, torch.true_divide, __import__("operator").truediv}
_DIV_METHODS = {"div", "div_", "true_divide"}
_SHAPE_METHODS = {"detach", "view", "reshape", "contiguous", "unsqueeze"}


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


def _is_norm(node: object) -> bool:
    """A norm, possibly behind ``detach``/views/casts (PEFT detaches DoRA's weight norm)."""
    while isinstance(node, Node) and (ops.is_call(node, {torch.detach}, _SHAPE_METHODS) or ops.is_dtype_cast(node)):
        node = node.args[0]
    return ops.is_call(node, _NORM_FNS, _NORM_METHODS)


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
            by_shape = any(ops.is_call(u, _DIV_FNS, _DIV_METHODS) and u.args[0] is node and _is_norm(u.args[1])
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
