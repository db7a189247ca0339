"""Head layout: how an attention operand is a head view of one projection's output.

``_trace_operand`` walks back from an operand (``[batch, heads, seq, head_dim]``) to the unit it
is a head view of, through exactly the ops that keep each head-dim channel in place: head views
and transposes, RoPE (rotate-half, interleaved, partial rotary; it mixes fixed channel pairs, which
are recorded so the kept set can be closed under them), scalar scaling, GQA head repeats
(``repeat_kv``, ``repeat_interleave``) and HF's empty KV-cache concatenation. The q/k and v/o
modules use it for every operand; the recognisers below are its steps.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch.fx import Node

from ... import graph_ops as ops
from ..units import LoraUnit, last_dim_piece, part_unit
from .common import (
    _SEARCH_DEPTH, _ancestors, _arg, _input, _is_identity_view, _is_passthrough, _is_scalar_scale, _node_args, _norm_dim,
    _NotAttn, _op_name, _pair_along, _Rope, _same_dim, _same_shape, _shape, _Side, _static, _swaps)

HEAD_NORM_REASON = "per-head norm before RoPE (q_norm/k_norm) needs every head dim"


# --- last-dim slices ----------------------------------------------------------------------------------

def _last_dim_slice(node: Any) -> tuple[Node, int, int, int] | None:
    """``src[..., start:stop:step]`` (Ellipsis or full leading slices): (src, start, stop, step)."""
    if not (isinstance(node, Node) and node.op == "call_function" and node.target is operator.getitem):
        return None
    src, idx = node.args
    shape = _shape(src)
    if not isinstance(src, Node) or shape is None or not shape:
        return None
    idx = idx if isinstance(idx, tuple) else (idx,)
    if idx and idx[0] is Ellipsis:
        rest = idx[1:]
    elif len(idx) == len(shape) and all(i == slice(None) for i in idx[:-1]):
        rest = idx[-1:]
    else:
        return None
    width = _static(shape[-1])
    if len(rest) != 1 or not isinstance(rest[0], slice) or width is None:
        return None
    sl = rest[0]
    if any(v is not None and _static(v) is None for v in (sl.start, sl.stop, sl.step)):
        return None
    start, stop, step = sl.indices(width)
    return src, start, stop, step


# --- RoPE ------------------------------------------------------------------------------------------

def _half(node: Any) -> tuple[Node, int, list[Node]] | None:
    """``x[..., :D/2]`` / ``x[..., D/2:]`` or ``x.chunk(2, -1)[i]``: (x, 0 or 1, nodes)."""
    sliced = _last_dim_slice(node)
    if sliced is not None:
        src, start, stop, step = sliced
        width = _static(_shape(src)[-1])  # type: ignore[index]
        if step == 1 and width is not None and width % 2 == 0:
            if (start, stop) == (0, width // 2):
                return src, 0, [node]
            if (start, stop) == (width // 2, width):
                return src, 1, [node]
        return None
    if isinstance(node, Node) and node.op == "call_function" and node.target is operator.getitem:
        chunk, i = node.args
        if (isinstance(chunk, Node) and ops.is_call(chunk, ops.CHUNK_FNS, ops.CHUNK_METHODS) and i in (0, 1)
                and _arg(chunk, 1, "chunks") == 2 and isinstance(chunk.args[0], Node)):
            shape = _shape(chunk.args[0])
            if shape is not None and _norm_dim(_arg(chunk, 2, "dim", 0), len(shape)) == len(shape) - 1:
                return chunk.args[0], i, [node, chunk]
    return None


def _negated(node: Any) -> Node | None:
    """``-x`` spelled ``neg(x)``, ``x.neg()`` or ``x * -1``: ``x``."""
    if not isinstance(node, Node):
        return None
    if ops.is_call(node, ops.NEG_FNS, ops.NEG_METHODS) and len(node.args) == 1 and isinstance(node.args[0], Node):
        return node.args[0]
    if ops.is_mul(node):
        lhs, rhs = node.args
        if rhs == -1 and isinstance(lhs, Node):
            return lhs
        if lhs == -1 and isinstance(rhs, Node):
            return rhs
    return None


def _depends_on(node: Any, target: Node) -> bool:
    """Whether ``node`` is computed from ``target`` (an ancestor search)."""
    return isinstance(node, Node) and any(cur is target for cur in _ancestors(node))


def _rotate_half(rot: Node) -> tuple[Node, list[Node]] | None:
    """``cat((-x2, x1), -1)`` with x1/x2 the two halves of x: (x, nodes)."""
    tensors = _pair_along(rot, ops.CAT_FNS)
    if tensors is None:
        return None
    second = _negated(tensors[0])
    h2, h1 = _half(second), _half(tensors[1])
    if h1 is None or h2 is None or h1[0] is not h2[0] or (h1[1], h2[1]) != (0, 1):
        return None
    return h1[0], [rot, tensors[0], *h1[2], *h2[2]]


def _rotate_interleaved(rot: Node) -> tuple[Node, list[Node]] | None:
    """``stack((-x[..., 1::2], x[..., ::2]), -1).flatten(-2)`` (or a reshape back to x's shape)."""
    if not ops.is_call(rot, ops.VIEW_FNS, ops.VIEW_METHODS) or not isinstance(_input(rot), Node):
        return None
    stack = _input(rot)
    tensors = _pair_along(stack, ops.STACK_FNS)
    if tensors is None:
        return None
    odd = _last_dim_slice(_negated(tensors[0]))
    even = _last_dim_slice(tensors[1])
    if odd is None or even is None or odd[0] is not even[0]:
        return None
    src = even[0]
    width = _static(_shape(src)[-1])  # type: ignore[index]
    if width is None or even[1:] != (0, width, 2) or odd[1:] != (1, width, 2):
        return None
    if not _same_shape(_shape(rot), _shape(src)):
        return None
    return src, [rot, stack, tensors[0], _negated(tensors[0]), tensors[1]]  # type: ignore[list-item]


def _full_rope(node: Node) -> _Rope | None:
    """``x * cos + rotate(x) * sin`` over the whole last dim of x."""
    if not ops.is_add(node) or not all(isinstance(a, Node) for a in node.args):
        return None
    for m_cos, m_sin in (node.args, node.args[::-1]):
        if not (ops.is_mul(m_cos) and ops.is_mul(m_sin)):
            continue
        for rot, sin in (m_sin.args, m_sin.args[::-1]):
            if not isinstance(rot, Node):
                continue
            for kind, fn in (("half", _rotate_half), ("interleaved", _rotate_interleaved)):
                found = fn(rot)
                if found is None:
                    continue
                src, inner = found
                if src not in m_cos.args:
                    continue
                cos = m_cos.args[1] if m_cos.args[0] is src else m_cos.args[0]
                if _depends_on(cos, src) or _depends_on(sin, src):
                    continue
                width = _static(_shape(src)[-1])  # type: ignore[index]
                if width is None:
                    continue
                return _Rope(src, kind, width, [node, m_cos, m_sin, *inner])
    return None


def _match_rope(node: Node) -> _Rope | None:
    """Full RoPE, or partial rotary ``cat([rope(x[..., :r]), x[..., r:]], -1)`` (GPT-NeoX, Phi)."""
    full = _full_rope(node)
    if full is not None:
        return full
    tensors = _pair_along(node, ops.CAT_FNS)
    if tensors is None or not isinstance(tensors[0], Node):
        return None
    inner = _full_rope(tensors[0])
    if inner is None:
        return None
    rot_part, pass_part = _last_dim_slice(inner.source), _last_dim_slice(tensors[1])
    if rot_part is None or pass_part is None or rot_part[0] is not pass_part[0]:
        return None
    src, start, stop, step = rot_part
    width = _static(_shape(src)[-1])  # type: ignore[index]
    if (start, step) != (0, 1) or pass_part[1:] != (stop, width, 1):
        return None
    return _Rope(src, inner.kind, stop, [node, inner.source, tensors[1], *inner.nodes])


# --- GQA repeats, the KV cache, what stops a walk ----------------------------------------------------

def _gqa_ok(heads: int, op_heads: int, kv_heads: int, enable_gqa: bool) -> bool:
    if kv_heads <= 0 or heads % kv_heads:
        return False
    return op_heads == heads or op_heads == 1 or (enable_gqa and heads % op_heads == 0)


def _is_empty_const(node: Any) -> bool:
    """A constant empty tensor built in the graph (HF's ``torch.tensor([])`` cache seed)."""
    if not isinstance(node, Node):
        return False
    val = ops.example_value(node)
    if not isinstance(val, torch.Tensor) or val.numel() != 0:
        return False
    if node.op == "get_attr":
        return True
    return ops.is_call(node, ops.EMPTY_CONST_FNS) and not _node_args(node)


def _cache_cat(node: Node, seq_dim: int) -> Node | None:
    """``torch.cat([empty, x], dim=seq)`` (the KV cache HF concatenates even in training): x."""
    tensors = _pair_along(node, ops.CAT_FNS, seq_dim)
    if tensors is None:
        return None
    empty, x = tensors
    if not _is_empty_const(empty) or not isinstance(x, Node) or not _same_shape(_shape(x), _shape(node)):
        return None
    return x


def _repeat_kv(node: Node) -> tuple[Node, int, list[Node]] | None:
    """HF ``repeat_kv``: ``x[:, :, None].expand(B, Hkv, n, T, D).reshape(B, Hkv*n, T, D)``, or
    ``x.repeat_interleave(n, dim=1)``: (x, n, nodes)."""
    if ops.is_call(node, ops.REPEAT_INTERLEAVE_FNS, ops.REPEAT_INTERLEAVE_METHODS):
        x = _input(node)
        repeats = _arg(node, 1, "repeats")
        shape = _shape(x)
        if (isinstance(x, Node) and shape is not None and len(shape) == 4 and _static(repeats) is not None
                and _norm_dim(_arg(node, 2, "dim"), 4) == 1):
            return x, repeats, [node]
        return None
    if not ops.is_call(node, ops.VIEW_FNS, ops.VIEW_METHODS) or not isinstance(_input(node), Node):
        return None
    expand = _input(node)
    if not ops.is_call(expand, methods=ops.EXPAND_METHODS) or not isinstance(_input(expand), Node):
        return None
    unsq = _input(expand)
    out, ex = _shape(node), _shape(expand)
    if out is None or ex is None or len(out) != 4 or len(ex) != 5:
        return None
    x: Any = None
    if unsq.op == "call_function" and unsq.target is operator.getitem:
        src, idx = unsq.args
        if isinstance(idx, tuple) and len(idx) >= 3 and idx[0] == slice(None) and idx[1] == slice(None) \
                and idx[2] is None and all(i == slice(None) for i in idx[3:]):
            x = src
    elif ops.is_call(unsq, ops.UNSQUEEZE_FNS, ops.UNSQUEEZE_METHODS) and _norm_dim(_arg(unsq, 1, "dim"), 5) == 2:
        x = _input(unsq)
    if not isinstance(x, Node):
        return None
    xs = _shape(x)
    if xs is None or len(xs) != 4 or _shape(unsq) is None or _static(_shape(unsq)[2]) != 1:  # type: ignore[index]
        return None
    hkv, n = _static(ex[1]), _static(ex[2])
    if hkv is None or n is None or _static(xs[1]) != hkv or _static(out[1]) != hkv * n:
        return None
    if not (_same_dim(out[0], xs[0]) and _same_dim(out[2], xs[2]) and _same_dim(out[3], xs[3])):
        return None
    return x, n, [node, expand, unsq]


def _split_piece(node: Node) -> bool:
    """A piece of a tensor split into parts (chunk/split/unbind item, or one of several slices)."""
    if node.op != "call_function" or node.target is not operator.getitem or not isinstance(node.args[0], Node):
        return False
    src = node.args[0]
    if ops.is_call(src, ops.SPLIT_FNS_WITH_UNBIND, ops.SPLIT_METHODS_WITH_UNBIND):
        return True
    siblings = [u for u in src.users if u.op == "call_function" and u.target is operator.getitem]
    return len(siblings) >= 2


def _head_norm(node: Node, head_dim: int) -> bool:
    """``node`` is (near) a normalisation over the head dim: a last-dim reduction of a
    [.., head_dim] tensor or ``layer_norm``/``rms_norm`` over ``(head_dim,)`` (Qwen3's q_norm/k_norm).

    Such a norm divides every head dim by a statistic of all of them, so q/k channels cannot be
    dropped before it (the statistic would change); the search stops at other linears.
    """
    frontier, seen = [node], set()
    for _ in range(_SEARCH_DEPTH):
        nxt: list[Node] = []
        for cur in frontier:
            if not isinstance(cur, Node) or cur in seen or ops.as_linear(cur) is not None:
                continue
            seen.add(cur)
            src = _input(cur)
            shape = _shape(src)
            if ops.is_call(cur, ops.NORM_LAYER_FNS) and tuple(_arg(cur, 1, "normalized_shape", ())) == (head_dim,):
                return True
            if (ops.is_call(cur, ops.REDUCE_FNS, ops.REDUCE_METHODS) and shape is not None and len(shape) >= 3
                    and _static(shape[-1]) == head_dim
                    and _norm_dim(_arg(cur, 1, "dim"), len(shape)) == len(shape) - 1):
                return True
            nxt.extend(_node_args(cur))
        frontier = nxt
    return False


# --- the walk ----------------------------------------------------------------------------------------

def _unit_behind(node: Any, by_output: dict[Node, LoraUnit]) -> LoraUnit | None:
    """The nearest unit upstream of ``node``, not looking through other linears (for naming only)."""
    frontier = [node]
    seen: set[Node] = set()
    for _ in range(_SEARCH_DEPTH):
        nxt: list[Node] = []
        for cur in frontier:
            if not isinstance(cur, Node) or cur in seen:
                continue
            seen.add(cur)
            if cur in by_output:
                return by_output[cur]
            if ops.as_linear(cur) is None:
                nxt.extend(_node_args(cur))
        frontier = nxt
    return None


def _trace_operand(operand: Any, side: str, by_output: dict[Node, LoraUnit]) -> _Side:
    """Walk back from an attention operand ([B, H, T, D]) to the unit whose output it is a head view of."""
    if not isinstance(operand, Node):
        raise _NotAttn(f"the {side} operand is not a graph tensor")
    shape = _shape(operand)
    if shape is None or len(shape) != 4 or _static(shape[1]) is None or _static(shape[3]) is None:
        raise _NotAttn(f"the {side} operand is not a static [batch, heads, seq, head_dim] tensor", operand,
                       _unit_behind(operand, by_output))
    op_heads, head_dim = int(shape[1]), int(shape[3])
    layout = "bhtd"  # -> "bthd" after the head transpose -> "flat" after the head view
    nodes: list[Node] = []
    rope: _Rope | None = None
    repeat: int | None = None
    cache: Node | None = None
    heads: int | None = None
    row_dim, sub_offset = head_dim, 0  # per-head rows at the view: 3 x head_dim for GPT-NeoX's fused qkv
    piece: Node | None = None  # the per-head slice of a fused output (set when row_dim != head_dim)
    shared: list[Node] = []
    cur: Any = operand
    for _ in range(64):
        if not isinstance(cur, Node):
            raise _NotAttn(f"a constant reaches the {side} operand", operand)
        if cur in by_output:
            unit = by_output[cur]
            if layout != "flat" or heads is None:
                raise _NotAttn(f"the {side} projection's output reaches the attention without a head view",
                               cur, unit)
            if heads * row_dim != unit.out_features:
                raise _NotAttn(f"{side} heads x head_dim = {heads} x {row_dim} != the projection's "
                               f"{unit.out_features} outputs", cur, unit)
            if op_heads != heads * (repeat or 1):
                raise _NotAttn(f"the {side} operand has {op_heads} heads, the projection {heads}", operand, unit)
            if row_dim != head_dim:  # a per-head interleaved part of a fused projection
                shared.append(cur)
                unit = part_unit(unit, side, sub_offset, heads * head_dim, piece, block=head_dim, period=row_dim)
                return _Side(unit, heads, head_dim, op_heads, rope, nodes, cache, shared)
            nodes.append(cur)
            return _Side(unit, heads, head_dim, op_heads, rope, nodes, cache)
        piece_of = last_dim_piece(cur)
        if piece_of is not None and layout == "flat" and heads is not None and piece_of[0] in by_output:
            parent, start, stop = by_output[piece_of[0]], piece_of[1], piece_of[2]
            if heads * head_dim != stop - start:
                raise _NotAttn(f"{side} heads x head_dim = {heads} x {head_dim} != the {stop - start} channels "
                               f"of its part of the fused projection", cur, parent)
            if op_heads != heads * (repeat or 1):
                raise _NotAttn(f"the {side} operand has {op_heads} heads, the projection {heads}", operand, parent)
            nodes.append(cur)
            unit = part_unit(parent, side, start, stop - start, cur)
            return _Side(unit, heads, head_dim, op_heads, rope, nodes, cache,
                         [piece_of[0]] + ([piece_of[3]] if piece_of[3] is not None else []))
        if (piece_of is not None and layout in ("bhtd", "bthd") and row_dim == head_dim
                and piece_of[2] - piece_of[1] == head_dim and _static(_shape(piece_of[0])[-1]) is not None):
            nodes.append(cur)
            piece = cur
            row_dim, sub_offset = int(_shape(piece_of[0])[-1]), piece_of[1]  # type: ignore[index]
            if piece_of[3] is not None:
                shared.append(piece_of[3])
            cur = piece_of[0]
            continue
        if row_dim != head_dim:  # between the fused output and its split: every part reads these
            shared.append(cur)
        else:
            nodes.append(cur)
        if _is_passthrough(cur) or _is_identity_view(cur):
            cur = _input(cur)
            continue
        scaled = _is_scalar_scale(cur)
        if scaled is not None:
            cur = scaled
            continue
        if side in ("k", "v") and cache is None and layout != "flat":
            x = _cache_cat(cur, 2 if layout == "bhtd" else 1)
            if x is not None:
                cache, cur = cur, x
                continue
        if side in ("k", "v") and repeat is None and layout == "bhtd":
            rep = _repeat_kv(cur)
            if rep is not None:
                cur, repeat = rep[0], rep[1]
                nodes.extend(rep[2][1:])
                continue
        if side in ("q", "k") and rope is None and layout != "flat":
            rope = _match_rope(cur)
            if rope is not None:
                if _static(_shape(rope.source)[-1]) != head_dim:  # type: ignore[index]
                    raise _NotAttn(f"RoPE on the {side} path is not over the head dim", cur,
                                   _unit_behind(cur, by_output))
                nodes.extend(n for n in rope.nodes[1:] if n not in nodes)
                cur = rope.source
                continue
        if layout == "bhtd" and _swaps(cur, 4, 1, 2):
            layout, cur = "bthd", _input(cur)
            continue
        if layout == "bthd" and ops.is_call(cur, ops.VIEW_FNS, ops.VIEW_METHODS) and isinstance(_input(cur), Node):
            out, inp = _shape(cur), _shape(_input(cur))
            if (out is not None and inp is not None and len(out) == 4 and len(inp) == 3
                    and _same_dim(out[0], inp[0]) and _same_dim(out[1], inp[1])
                    and _static(out[2]) is not None and _static(out[3]) == row_dim
                    and _static(inp[2]) == out[2] * row_dim):
                heads, layout, cur = int(out[2]), "flat", _input(cur)
                continue
        if side in ("q", "k") and layout != "flat" and _head_norm(cur, head_dim):
            raise _NotAttn(HEAD_NORM_REASON, cur, _unit_behind(cur, by_output))
        # a split piece is reported as a fused projection when another operand comes from the same unit
        raise _NotAttn(f"op `{_op_name(cur)}` on the {side} path is not a head view, RoPE, scale, GQA repeat "
                       f"or KV-cache concat", cur, _unit_behind(cur, by_output), split=_split_piece(cur))
    raise _NotAttn(f"the {side} path is too long", operand)
