"""Assemble units into groups whose channels can be dropped consistently.

A group is proven from the dataflow, never from module names: the MLP's intermediate must flow
only through channel-wise ops from the up side to the down side; attention groups (in
``attention/``) follow the heads through views, RoPE and the attention op. What cannot be
proven is not grouped and lands in ``skipped`` with the op and the place that stopped it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.fx import Node

from ...policy import GROUP_KINDS as _POLICY_GROUP_KINDS
from .. import graph_ops as ops
from .units import LoraUnit, last_dim_piece, part_unit

log = logging.getLogger("sparselora_fx")

GroupKind = Literal["gated_mlp", "mlp", "attn_qk", "attn_vo"]  # spelled out for type checkers
GROUP_KINDS: tuple[str, ...] = tuple(_POLICY_GROUP_KINDS)  # the policy owns the kinds (and their keys)
ROLES: dict[str, tuple[str, ...]] = {
    "gated_mlp": ("gate", "up", "down"),
    "mlp": ("fc1", "fc2"),
    "attn_qk": ("q", "k"),
    "attn_vo": ("v", "o"),
}


@dataclass
class Group:
    """Units that share one kept-channel set per micro-batch.

    ``units`` are ordered by ``ROLES[kind]``. MLP groups carry the activation and the interior
    nodes (between the up side and the down side) that narrow with the kept set; attention groups
    carry the head layout read off the graph.
    """

    kind: str
    units: list[LoraUnit]
    name: str
    act: str | None = None
    interior: list[Node] = field(default_factory=list)
    num_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    rope: str = "none"  # "none" | "half" | "interleaved"
    rotary_dim: int = 0
    attention_node: Node | None = None
    mask: Node | None = None  # a [batch, seq] padding mask (1 = real token), when the graph has one

    @property
    def policy_kind(self) -> str:
        """The policy key for this group (``mlp`` covers gated and plain MLPs)."""
        return "mlp" if self.kind in ("gated_mlp", "mlp") else self.kind

    @property
    def channels(self) -> int:
        """N, the number of channels the kept set is drawn from."""
        if self.kind in ("gated_mlp", "mlp"):
            return self.units[0].out_features
        if self.kind == "attn_vo":
            return self.units[0].out_features
        assert self.head_dim is not None
        return self.head_dim

    def unit(self, role: str) -> LoraUnit:
        return self.units[ROLES[self.kind].index(role)]


@dataclass
class Skipped:
    """Something not grouped (or not rewritten), with the reason a user can act on."""

    name: str
    reason: str
    where: str = ""


def common_prefix(names: list[str]) -> str:
    """``model.layers.0.mlp.gate_proj`` + ``...up_proj`` -> ``model.layers.0.mlp``."""
    split = [n.split("#")[0].split(".") for n in names]
    out: list[str] = []
    for parts in zip(*split):
        if len(set(parts)) != 1:
            break
        out.append(parts[0])
    return ".".join(out) or names[0]


def expand_fused(units: list[LoraUnit], groups: list[Group]) -> list[LoraUnit]:
    """``units`` with each fused projection that has a grouped part replaced by its parts.

    Why: the report, the plan and the rewrite speak of units with one role each; a fused qkv_proj
    is three (q, k, v). Parts take the parent's name plus ``[role]``.
    """
    grouped = {id(u) for g in groups for u in g.units}
    out: list[LoraUnit] = []
    for unit in units:
        parts = sorted(unit.parts.values(), key=lambda u: u.part.offset)  # type: ignore[union-attr]
        if not any(id(p) in grouped for p in parts):
            out.append(unit)
            continue
        for p in parts:
            if p.role:
                p.fqn = f"{unit.fqn}[{p.role}]"
        out.extend(parts)
    return out


def activation_name(node: Node) -> str | None:
    """The activation a node applies, in the names the selection ops accept."""
    if node.op == "call_function":
        if node.target is F.gelu:
            approx = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
            return "gelu_tanh" if approx == "tanh" else "gelu"
        return ops.ACTIVATIONS.get(node.target)
    if node.op == "call_method":
        return ops.ACTIVATION_METHODS.get(node.target)
    return None


_FORMULA_MAX_NODES = 24
_PROBE = torch.linspace(-8.0, 8.0, 161, dtype=torch.float64)


def _formula_nodes(root: Node) -> tuple[Node, list[Node]] | None:
    """The one tensor ``x`` that ``root`` is an elementwise formula of (scalars aside), and the formula's nodes."""
    nodes: list[Node] = []
    leaves: set[Node] = set()
    stack = [root]
    while stack:
        n = stack.pop()
        if n in nodes or n in leaves:
            continue
        if ops.is_call(n, ops.FORMULA_FNS, ops.FORMULA_METHODS) and not n.kwargs:
            if not all(isinstance(a, Node) or ops.is_scalar(a) for a in n.args):
                return None
            nodes.append(n)
            stack.extend(a for a in n.args if isinstance(a, Node))
        elif ops.is_scalar_like(n):
            return None
        else:
            leaves.add(n)
        if len(nodes) > _FORMULA_MAX_NODES:
            return None
    if len(leaves) != 1 or len(nodes) < 2:
        return None
    return next(iter(leaves)), nodes


def _evaluate(root: Node, x: Node, values: torch.Tensor) -> torch.Tensor:
    """Run the formula from ``x`` to ``root`` on ``values`` (float64, eager)."""
    env: dict[Node, Any] = {x: values}

    def run(n: Node) -> Any:
        if n not in env:
            args = [run(a) if isinstance(a, Node) else a for a in n.args]
            if n.op == "call_method":
                env[n] = getattr(args[0], n.target)(*args[1:])
            else:
                env[n] = n.target(*args)
        return env[n]

    return run(root)


def formula_activation(node: Node) -> tuple[str, Node, list[Node]] | None:
    """An activation spelled as elementwise ops (GPT-2's ``gelu_new``): (name, x, the formula's nodes).

    Why by value: the same function has many spellings (``0.5 * x * (1 + tanh(...))``, ``x * 0.5 *
    ...``, FastGELU's ``x * x`` for ``x ** 2``); a sub-graph that is an elementwise function of one
    tensor is identified by evaluating it on 161 points in [-8, 8] and comparing with each named
    activation the selection ops know, to 1e-6.
    """
    from ...runtime.selection import ACTIVATIONS

    if not (ops.is_mul(node) or ops.is_call(node, ops.FORMULA_FNS, ops.FORMULA_METHODS)):
        return None
    found = _formula_nodes(node)
    if found is None:
        return None
    x, nodes = found
    try:
        with torch.no_grad():
            y = _evaluate(node, x, _PROBE.clone())
    except Exception:  # noqa: BLE001 - a formula we cannot evaluate is simply not an activation
        return None
    if not isinstance(y, torch.Tensor) or y.shape != _PROBE.shape:
        return None
    for name, fn in ACTIVATIONS.items():
        ref = fn(_PROBE)
        if torch.allclose(y, ref, rtol=1e-6, atol=1e-6):
            return name, x, nodes
    return None


class _NotMLP(Exception):
    def __init__(self, reason: str, where: Node | None = None):
        super().__init__(reason)
        self.reason = reason
        self.where = where.name if where is not None else ""


def _trace_mlp(down: LoraUnit, by_output: dict[Node, LoraUnit]
               ) -> tuple[list[tuple[LoraUnit, bool]], str, list[Node], Node | None]:
    """Walk back from the down unit's input to the units that produce it through channel-wise ops.

    Returns the producer units (each with whether it sits under the activation: the gate), the
    activation, the interior nodes that narrow, and the gating multiply (None for a plain MLP).
    """
    interior: list[Node] = []
    sources: list[tuple[LoraUnit, bool]] = []
    act_node: Node | None = None
    gated_mul: Node | None = None
    act: str | None = None

    def visit(node: object, under_act: bool) -> None:
        nonlocal act_node, gated_mul, act
        if not isinstance(node, Node):
            raise _NotMLP("a constant reaches the down projection's input")
        if node in by_output:
            unit = by_output[node]
            if unit.scope is not down.scope:
                raise _NotMLP("producer unit is in another graph scope", node)
            sources.append((unit, under_act))
            return
        if node in interior:
            raise _NotMLP("the intermediate is reused inside the MLP", node)
        piece = last_dim_piece(node)
        if piece is not None and piece[0] in by_output:
            parent = by_output[piece[0]]
            if parent.scope is not down.scope:
                raise _NotMLP("producer unit is in another graph scope", node)
            start, stop = piece[1], piece[2]
            sources.append((part_unit(parent, f"{start}:{stop}", start, stop - start, node), under_act))
            return
        name = activation_name(node)
        if name is not None:
            if act_node is not None:
                raise _NotMLP("two activations between the projections", node)
            act_node, act = node, name
            interior.append(node)
            visit(node.args[0], True)
            return
        formula = formula_activation(node)
        if formula is not None:
            if act_node is not None:
                raise _NotMLP("two activations between the projections", node)
            act, x, nodes = formula
            act_node = node
            interior.extend(nodes)
            visit(x, True)
            return
        if ops.is_dtype_cast(node) or ops.is_dropout(node) or ops.is_call(node, methods=ops.CONTIGUOUS_METHODS):
            interior.append(node)
            visit(node.args[0], under_act)
            return
        if ops.is_mul(node) and all(isinstance(a, Node) for a in node.args) and gated_mul is None:
            gated_mul = node
            interior.append(node)
            visit(node.args[0], under_act)
            visit(node.args[1], under_act)
            return
        raise _NotMLP(f"op `{node.target}` between the projections is not channel-wise", node)

    visit(down.input, False)
    if act is None:
        raise _NotMLP("no activation between the projections")
    return sources, act, interior, gated_mul


def _check_contained(group_nodes: set[Node], down: LoraUnit, sources: list[LoraUnit]) -> None:
    """Every user of the narrowing nodes must be inside the group, or narrowing changes others' inputs."""
    allowed = set(group_nodes)
    allowed.add(down.base.node)
    allowed.update(down.base.inner)
    for b in down.branches:
        allowed.update({b.a.node, b.a.input})
        if b.dropout is not None:
            allowed.add(b.dropout)
    cur = down.base.input
    while isinstance(cur, Node) and cur is not down.input:
        allowed.add(cur)
        cur = cur.args[0]
    for node in list(group_nodes) + [s.output for s in sources]:
        for user in node.users:
            if user not in allowed and not _feeds_only(user, allowed):
                raise _NotMLP(f"the intermediate is also used by `{user.name}` outside the MLP", user)


def _check_parts(members: list[LoraUnit]) -> None:
    """A fused gate_up must be read only through the group's pieces, all of them, without overlap."""
    parents = {id(u.part.parent): u.part.parent for u in members if u.part is not None}
    for parent in parents.values():
        parts = sorted((u.part for u in members if u.part is not None and u.part.parent is parent),
                       key=lambda p: p.offset)
        if len(parts) < 2 or any(p.width != parts[0].width for p in parts):
            raise _NotMLP(f"fused projection `{parent.fqn}`: only some of its parts feed this MLP", parent.output)
        if [(p.offset, p.offset + p.width) for p in parts] != [
                (i * parts[0].width, (i + 1) * parts[0].width) for i in range(len(parts))] or \
                parts[-1].offset + parts[-1].width != parent.out_features:
            raise _NotMLP(f"fused projection `{parent.fqn}`: its parts do not tile its output", parent.output)
        pieces = {p.piece for p in parts}
        split_nodes = {p.piece.args[0] for p in parts} - {parent.output}
        for user in parent.output.users:
            if user not in pieces and user not in split_nodes:
                raise _NotMLP(f"fused projection `{parent.fqn}` is also used by `{user.name}`", user)
        for split in split_nodes:
            if any(user not in pieces for user in split.users):
                raise _NotMLP(f"fused projection `{parent.fqn}`: a piece is used outside the MLP", split)


def _feeds_only(node: Node, allowed: set[Node]) -> bool:
    """A cast/dropout chain on the way into the down unit (PEFT casts x per adapter)."""
    while (ops.is_dtype_cast(node) or ops.is_dropout(node)) and len(node.users) == 1:
        node = next(iter(node.users))
        if node in allowed:
            return True
    return node in allowed


def find_mlp_groups(units: list[LoraUnit]) -> tuple[list[Group], list[Skipped]]:
    """Gated (gate, up -> act(gate) * up -> down) and plain (fc1 -> act -> fc2) MLP groups."""
    by_output = {u.output: u for u in units}
    groups: list[Group] = []
    skipped: list[Skipped] = []
    for down in units:
        if not _feeds_from_unit(down.input, by_output):
            continue
        try:
            sources, act, interior, gated_mul = _trace_mlp(down, by_output)
            gates = [u for u, under_act in sources if under_act]
            ups = [u for u, under_act in sources if not under_act]
            if len(gates) == 1 and len(ups) == 1 and gated_mul is not None:
                gate, up = gates[0], ups[0]
                if gate is up or gate.out_features != up.out_features:
                    raise _NotMLP("gate and up widths differ")
                kind, members, roles = "gated_mlp", [gate, up, down], ("gate", "up", "down")
            elif len(gates) == 1 and not ups and gated_mul is None:
                kind, members, roles = "mlp", [gates[0], down], ("fc1", "fc2")
            else:
                raise _NotMLP(f"{len(sources)} producer units; expected gate+up or fc1")
            if members[0].out_features != down.in_features:
                raise _NotMLP("intermediate width differs from the down projection's input")
            _check_contained(set(interior), down, [u for u, _ in sources])
            _check_parts(members)
        except _NotMLP as err:
            skipped.append(Skipped(down.fqn, f"MLP not grouped: {err.reason}", err.where))
            continue
        for unit, role in zip(members, roles):
            unit.role = role
        groups.append(Group(kind=kind, units=members, name=common_prefix([u.fqn for u in members]),
                            act=act, interior=interior))
    return groups, skipped


def _feeds_from_unit(node: object, by_output: dict[Node, LoraUnit], depth: int = 4) -> bool:
    """Cheap pre-check: a unit output is reachable backwards within a few hops (any ops).

    Generous on purpose: a candidate that fails the real trace is reported with the op that
    stopped it; callers drop that record if the unit is grouped some other way (attention).
    """
    frontier = [node]
    for _ in range(depth):
        nxt: list[object] = []
        for n in frontier:
            if not isinstance(n, Node):
                continue
            if n in by_output:
                return True
            if n.op in ("call_function", "call_method"):
                nxt.extend(a for a in n.args if isinstance(a, Node))
        frontier = nxt
    return False
