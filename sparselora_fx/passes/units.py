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
