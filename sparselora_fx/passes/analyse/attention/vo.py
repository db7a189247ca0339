"""From the attention output to o: group [v, o] on shared value channels.

SparseLoRA drops the same value channels from v and from o's input: attention mixes tokens, never
channels. The v operand is walked back by ``layout._trace_operand``; the output is walked forward
here, through the head merge to o's input, and every node on the way must stay inside the group.
"""

from __future__ import annotations

from torch.fx import Node

from ... import graph_ops as ops
from ..groups import Group, common_prefix
from ..units import LoraUnit
from .common import (
    _SEARCH_DEPTH, _check_side_contained, _free, _is_identity_view, _is_passthrough, _NotAttn, _op_name,
    _same_dim, _shape, _Side, _Site, _static, _swaps)
from .layout import _gqa_ok


# --- the output walk ---------------------------------------------------------------------------------

def _trace_output(site: _Site, by_input: dict[Node, list[LoraUnit]]) -> tuple[LoraUnit, int, int, list[Node]]:
    """Walk forward from the attention output ([B, H, T, D]) through the head merge to o's input."""
    shape = _shape(site.node)
    if shape is None or len(shape) != 4 or _static(shape[1]) is None or _static(shape[3]) is None:
        raise _NotAttn("the attention output is not a static [batch, heads, seq, head_dim] tensor", site.node,
                       _unit_ahead(site.node, by_input))
    heads, head_dim = int(shape[1]), int(shape[3])
    layout = "bhtd"
    nodes: list[Node] = []
    cur = site.node
    for _ in range(32):
        nodes.append(cur)
        if layout == "flat" and cur in by_input:
            units = by_input[cur]
            if len(units) != 1:
                raise _NotAttn(f"the attention output feeds {len(units)} projections", cur, units[0])
            return units[0], heads, head_dim, nodes
        users = list(cur.users)
        if len(users) != 1:
            raise _NotAttn(f"the attention output is used {len(users)} times before the o projection", cur,
                           _unit_ahead(cur, by_input))
        nxt = users[0]
        if not nxt.args or nxt.args[0] is not cur:
            raise _NotAttn(f"op `{_op_name(nxt)}` after the attention is not a head merge", nxt,
                           _unit_ahead(nxt, by_input))
        if _is_passthrough(nxt) or _is_identity_view(nxt):
            cur = nxt
            continue
        if layout == "bhtd" and _swaps(nxt, 4, 1, 2):
            layout, cur = "bthd", nxt
            continue
        if layout == "bthd" and ops.is_call(nxt, ops.VIEW_FNS, ops.VIEW_METHODS):
            out, inp = _shape(nxt), _shape(cur)
            if (out is not None and inp is not None and len(out) == 3 and len(inp) == 4
                    and _same_dim(out[0], inp[0]) and _same_dim(out[1], inp[1])
                    and _static(out[2]) == heads * head_dim):
                layout, cur = "flat", nxt
                continue
        raise _NotAttn(f"op `{_op_name(nxt)}` after the attention is not a head merge", nxt,
                       _unit_ahead(nxt, by_input))
    raise _NotAttn("the attention output path is too long", site.node)


def _unit_ahead(node: Node, by_input: dict[Node, list[LoraUnit]]) -> LoraUnit | None:
    """The nearest unit downstream of ``node``, not looking through other linears (for naming only)."""
    frontier = [node]
    seen: set[Node] = set()
    for _ in range(_SEARCH_DEPTH):
        nxt: list[Node] = []
        for cur in frontier:
            if cur in seen:
                continue
            seen.add(cur)
            if cur in by_input:
                return by_input[cur][0]
            if cur is node or ops.as_linear(cur) is None:
                nxt.extend(cur.users)
        frontier = nxt
    return None


# --- containment and the v/o group -------------------------------------------------------------------

def _unit_consumers(unit: LoraUnit) -> set[Node]:
    """The nodes of ``unit`` that read its input (base and LoRA A, with PEFT's casts/dropout)."""
    allowed = {unit.base.node, *unit.base.inner}
    starts = [unit.base.input] + [b.a.input for b in unit.branches]
    allowed.update(b.a.node for b in unit.branches)
    for cur in starts:
        while isinstance(cur, Node) and cur is not unit.input:
            allowed.add(cur)
            cur = cur.args[0] if cur.args else None
    return allowed


def _check_output_contained(o: LoraUnit, nodes: list[Node]) -> None:
    allowed = set(nodes) | _unit_consumers(o)
    for user in o.input.users:
        if user not in allowed:
            raise _NotAttn(f"o's input is also used by `{user.name}` outside the attention", user, o)


def _group_vo(site: _Site, v: _Side, out: tuple[LoraUnit, int, int, list[Node]], mask: Node | None) -> Group:
    o, heads, head_dim, nodes = out
    if v.unit is o:
        raise _NotAttn("v and o are one projection", site.node, o)
    if head_dim != v.head_dim:
        raise _NotAttn(f"attention output head_dim {head_dim} != v head_dim {v.head_dim}", site.node, v.unit)
    if o.in_features != heads * head_dim:
        raise _NotAttn(f"o's {o.in_features} inputs != {heads} heads x {head_dim}", site.node, o)
    if not _gqa_ok(heads, v.op_heads, v.heads, site.enable_gqa):
        raise _NotAttn(f"{heads} attention heads cannot share {v.heads} v heads here", site.node, v.unit)
    _free(v.unit)
    _free(o)
    _check_side_contained(v, site.v_user, "v")
    _check_output_contained(o, nodes)
    v.unit.role, o.role = "v", "o"
    return Group(kind="attn_vo", units=[v.unit, o], name=common_prefix([v.unit.fqn, o.fqn]),
                 num_heads=heads, num_kv_heads=v.heads, head_dim=head_dim, rope="none", rotary_dim=0,
                 attention_node=site.node, mask=mask)
