"""Where q and k meet: find the attention ops, and group [q, k] on shared head-dim channels.

SparseLoRA drops the same head-dim channels from q and k: the score ``q . k`` is a sum over them.
Attention ops recognised: ``F.scaled_dot_product_attention`` (incl. ``enable_gqa``) and eager
attention ``softmax(q @ k^T * scale (-> soft-cap) (+ mask)) (-> dropout) @ v``; each operand is
then walked back by ``layout._trace_operand``.
"""

from __future__ import annotations

from typing import Any, Iterable

from torch.fx import Node

from ... import graph_ops as ops
from ..groups import Group, common_prefix
from .common import (
    _ancestors, _arg, _check_side_contained, _free, _input, _is_passthrough, _is_scalar_scale, _norm_dim,
    _NotAttn, _shape, _Side, _Site, _swaps)
from .layout import _gqa_ok


# --- attention sites -------------------------------------------------------------------------------

def _sdpa_site(node: Node) -> _Site:
    return _Site(node, _arg(node, 0, "query"), _arg(node, 1, "key"), _arg(node, 2, "value"), node, node, node,
                 enable_gqa=bool(_arg(node, 7, "enable_gqa", False)), mask=_arg(node, 3, "attn_mask"))


def _scores_matmul(node: Any, masks: list[Any]) -> Node | None:
    """Walk back from the softmax input through scale, mask and casts to the ``q @ k^T`` matmul."""
    for _ in range(16):
        if not isinstance(node, Node):
            return None
        if ops.is_call(node, ops.MATMUL_FNS, ops.MATMUL_METHODS) and len(node.args) == 2:
            return node
        if _is_passthrough(node):
            node = _input(node)
            continue
        scaled = _is_scalar_scale(node)
        if scaled is not None:
            node = scaled
            continue
        if ops.is_add(node):
            lhs, rhs = node.args
            found = _scores_matmul(lhs, masks)
            if found is not None:
                masks.append(rhs)
                return found
            found = _scores_matmul(rhs, masks)
            if found is not None:
                masks.append(lhs)
            return found
        if ops.is_call(node, ops.MASKED_FILL_FNS, ops.MASKED_FILL_METHODS):
            masks.append(_arg(node, 1, "mask"))
            node = _input(node)
            continue
        if ops.is_call(node, ops.SOFTCAP_FNS, ops.SOFTCAP_METHODS):  # Gemma2's c * tanh(s / c)
            node = _input(node)
            continue
        return None
    return None


def _eager_site(node: Node) -> _Site | None:
    """``softmax(q @ k^T ...) @ v``: the P @ V matmul, its softmax and the score matmul."""
    if not ops.is_call(node, ops.MATMUL_FNS, ops.MATMUL_METHODS) or len(node.args) != 2:
        return None
    probs, value = node.args
    if not all(isinstance(a, Node) for a in (probs, value)):
        return None
    while isinstance(probs, Node) and _is_passthrough(probs):
        probs = _input(probs)
    if not ops.is_call(probs, ops.SOFTMAX_FNS, ops.SOFTMAX_METHODS):
        return None
    shape = _shape(probs)
    if shape is None or _norm_dim(_arg(probs, 1, "dim"), len(shape)) != len(shape) - 1:
        return None
    masks: list[Any] = []
    qk = _scores_matmul(_input(probs), masks)
    if qk is None:
        return None
    query, key_t = qk.args
    if not isinstance(key_t, Node) or _shape(key_t) is None:
        return None
    nd = len(_shape(key_t))  # type: ignore[arg-type]
    if key_t.op == "call_function" and key_t.target is getattr and key_t.args[1] == "mT":
        key = _input(key_t)
    elif nd >= 2 and _swaps(key_t, nd, nd - 2, nd - 1):
        key = _input(key_t)
    else:
        return None
    return _Site(node, query, key, value, qk, key_t, node, enable_gqa=False, mask=masks[0] if masks else None)


def _find_sites(nodes: Iterable[Node]) -> list[_Site]:
    sites: list[_Site] = []
    for node in nodes:
        if ops.is_call(node, ops.SDPA_FNS):
            sites.append(_sdpa_site(node))
            continue
        site = _eager_site(node)
        if site is not None:
            sites.append(site)
    return sites


def _padding_mask(mask: Any) -> Node | None:
    """The ``attention_mask`` input placeholder ([batch, seq]) the attention mask is built from."""
    if not isinstance(mask, Node):
        return None
    for cur in _ancestors(mask):
        if cur.op == "placeholder" and "attention_mask" in cur.name.lower():
            shape = _shape(cur)
            if shape is not None and len(shape) == 2:
                return cur
    return None


# --- the q/k group -----------------------------------------------------------------------------------

def _group_qk(site: _Site, q: _Side, k: _Side, mask: Node | None) -> Group:
    if q.unit is k.unit:
        raise _NotAttn("q and k come from one projection", site.node, q.unit)
    if q.head_dim != k.head_dim:
        raise _NotAttn(f"q head_dim {q.head_dim} != k head_dim {k.head_dim}", site.node, q.unit)
    q_rope = (q.rope.kind, q.rope.rotary_dim) if q.rope else ("none", 0)
    k_rope = (k.rope.kind, k.rope.rotary_dim) if k.rope else ("none", 0)
    if q_rope != k_rope:
        raise _NotAttn(f"q and k differ in RoPE ({q_rope} vs {k_rope})", site.node, q.unit)
    if q.op_heads != q.heads:
        raise _NotAttn("q heads are repeated before the attention", site.node, q.unit)
    if not _gqa_ok(q.heads, k.op_heads, k.heads, site.enable_gqa):
        raise _NotAttn(f"{q.heads} q heads cannot share {k.heads} k heads here", site.node, q.unit)
    _free(q.unit)
    _free(k.unit)
    _check_side_contained(q, site.q_user, "q")
    _check_side_contained(k, site.k_user, "k")
    q.unit.role, k.unit.role = "q", "k"
    return Group(kind="attn_qk", units=[q.unit, k.unit], name=common_prefix([q.unit.fqn, k.unit.fqn]),
                 num_heads=q.heads, num_kv_heads=k.heads, head_dim=q.head_dim, rope=q_rope[0],
                 rotary_dim=q_rope[1], attention_node=site.node, mask=mask)
