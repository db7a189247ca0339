"""Prove attention groups: [q, k] share head-dim channels, [v, o] share value channels.

SparseLoRA drops the same head-dim channels from q and k (the score ``q . k`` is a sum over them)
and the same value channels from v and from o's input (attention mixes tokens, never channels).
Both hold only when the graph between the projections and the attention op is made of ops that
keep each head-dim channel in place: head views and transposes, RoPE (which mixes fixed channel
pairs, recorded so the kept set can be closed under them), scalar scaling, GQA head repeats and
HF's empty KV-cache concatenation. This pass walks back from each attention op's operands (and
forward from its output) through exactly those ops; anything else stops the proof and lands in
``skipped`` with the op and the node that stopped it.

Attention ops recognised: ``F.scaled_dot_product_attention`` (incl. ``enable_gqa``) and eager
attention ``softmax(q @ k^T * scale (-> soft-cap) (+ mask)) (-> dropout) @ v``.

Torch targets that only attention matching needs live in the sets below (the shared op table is
``graph_ops``; these may move there).
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch.fx import Node

from . import graph_ops as ops
from .groups import Group, Skipped, common_prefix
from .units import LoraUnit, last_dim_piece, part_unit

log = logging.getLogger("sparselora_fx")

# --- attention-specific torch targets (see module docstring) -------------------------------------
SOFTMAX_FNS = {F.softmax, torch.softmax, torch.nn.functional.softmax}
SOFTMAX_METHODS = {"softmax"}
NEG_FNS = {operator.neg, torch.neg}
NEG_METHODS = {"neg", "__neg__"}
DIV_FNS = {operator.truediv, operator.itruediv, torch.div, torch.true_divide}
DIV_METHODS = {"div", "div_", "true_divide", "__truediv__"}
CAT_FNS = {torch.cat, torch.concat, torch.concatenate}
STACK_FNS = {torch.stack}
VIEW_FNS = {torch.reshape, torch.flatten, torch.unflatten}
VIEW_METHODS = {"view", "reshape", "flatten", "unflatten"}
TRANSPOSE_FNS = {torch.transpose, torch.permute, torch.swapaxes, torch.swapdims}
HEAD_TRANSPOSE_METHODS = {"transpose", "permute", "swapaxes", "swapdims"}
EXPAND_METHODS = {"expand"}
REPEAT_INTERLEAVE_FNS = {torch.repeat_interleave}
REPEAT_INTERLEAVE_METHODS = {"repeat_interleave"}
SPLIT_FNS = {torch.chunk, torch.split, torch.unbind, torch.tensor_split}
SPLIT_METHODS = {"chunk", "split", "unbind", "tensor_split", "split_with_sizes"}
MASKED_FILL_FNS = {torch.masked_fill}
MASKED_FILL_METHODS = {"masked_fill"}
EMPTY_CONST_FNS = {torch.tensor, torch.empty, torch.zeros}
# Logit soft-capping c * tanh(s / c) (Gemma2) between the score matmul and the softmax. Q/K stays
# sparse under it: the criterion bounds the error dropped head dims add to the raw logit s, and
# s -> c * tanh(s / c) is monotone and 1-Lipschitz, so the capped logit's error is never larger.
SOFTCAP_FNS = {torch.tanh}
SOFTCAP_METHODS = {"tanh"}

FUSED_REASON = ("fused projection (qkv in one weight) split in a way this pass cannot map to weight rows "
                "(only last-dim chunk/split/slices, flat or per head, are); it runs dense")
HEAD_NORM_REASON = "per-head norm before RoPE (q_norm/k_norm) needs every head dim"
REDUCE_FNS = {torch.mean, torch.sum, torch.var, torch.std, torch.norm, torch.linalg.vector_norm, torch.amax}
REDUCE_METHODS = {"mean", "sum", "var", "std", "norm", "amax"}
NORM_FNS = {F.layer_norm, F.rms_norm, F.group_norm}
_SEARCH_DEPTH = 12  # how far to look past a failure for the unit to name in `skipped`


# --- small graph helpers --------------------------------------------------------------------------

def _shape(node: Any) -> tuple[Any, ...] | None:
    val = ops.example_value(node)
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _static(dim: Any) -> int | None:
    """A dimension as an int, or None when it is symbolic (never guard on it here)."""
    return dim if isinstance(dim, int) and not isinstance(dim, bool) else None


def _same_dim(a: Any, b: Any) -> bool:
    """Equal sizes without creating guards: ints compare, symbols compare by expression."""
    if _static(a) is not None and _static(b) is not None:
        return a == b
    return str(a) == str(b)


def _same_shape(a: tuple[Any, ...] | None, b: tuple[Any, ...] | None) -> bool:
    return a is not None and b is not None and len(a) == len(b) and all(_same_dim(x, y) for x, y in zip(a, b))


def _arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else default


def _norm_dim(dim: Any, ndim: int) -> int | None:
    if _static(dim) is None:
        return None
    return dim % ndim if -ndim <= dim < ndim else None


def _op_name(node: Node) -> str:
    target = node.target
    if isinstance(target, str):
        return target
    return getattr(target, "__name__", str(target))


def _input(node: Node) -> Any:
    """The tensor an op is applied to (first positional argument, or ``input=``/``self=``)."""
    if node.args:
        return node.args[0]
    return node.kwargs.get("input", node.kwargs.get("self"))


def _node_args(node: Node) -> list[Node]:
    out: list[Node] = []
    torch.fx.node.map_arg((node.args, node.kwargs), lambda n: out.append(n))
    return out


def _is_scalar_scale(node: Node) -> Node | None:
    """``x * c``, ``c * x`` or ``x / c`` with a scalar ``c``: the tensor ``x`` (channels stay put)."""
    if ops.is_call(node, ops.MUL_FNS, ops.MUL_METHODS) and len(node.args) == 2 and not node.kwargs:
        lhs, rhs = node.args
        if ops.is_scalar_like(rhs) and isinstance(lhs, Node) and not ops.is_scalar_like(lhs):
            return lhs
        if ops.is_scalar_like(lhs) and isinstance(rhs, Node) and not ops.is_scalar_like(rhs):
            return rhs
    if ops.is_call(node, DIV_FNS, DIV_METHODS) and len(node.args) == 2 and not node.kwargs:
        lhs, rhs = node.args
        if ops.is_scalar_like(rhs) and isinstance(lhs, Node) and not ops.is_scalar_like(lhs):
            return lhs
    return None


def _negated(node: Any) -> Node | None:
    """``-x`` spelled ``neg(x)``, ``x.neg()`` or ``x * -1``: ``x``."""
    if not isinstance(node, Node):
        return None
    if ops.is_call(node, NEG_FNS, NEG_METHODS) and len(node.args) == 1 and isinstance(node.args[0], Node):
        return node.args[0]
    if ops.is_mul(node):
        lhs, rhs = node.args
        if rhs == -1 and isinstance(lhs, Node):
            return lhs
        if lhs == -1 and isinstance(rhs, Node):
            return rhs
    return None


def _is_passthrough(node: Node) -> bool:
    return ops.is_dtype_cast(node) or ops.is_dropout(node) or ops.is_call(node, methods=ops.CONTIGUOUS_METHODS)


def _is_identity_view(node: Node) -> bool:
    """A view/reshape whose result has the input's shape (HF's ``reshape(B, -1, T, D)`` no-ops)."""
    return (ops.is_call(node, VIEW_FNS, VIEW_METHODS) and isinstance(_input(node), Node)
            and _same_shape(_shape(node), _shape(_input(node))))


def _permutation(node: Node) -> tuple[int, ...] | None:
    """The dimension permutation a transpose/permute applies, or None."""
    if not ops.is_call(node, TRANSPOSE_FNS, HEAD_TRANSPOSE_METHODS) or not isinstance(_input(node), Node):
        return None
    shape = _shape(_input(node))
    if shape is None:
        return None
    nd = len(shape)
    if _op_name(node) == "permute":
        dims = node.args[1:]
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = tuple(dims[0])
        dims = tuple(node.kwargs.get("dims", dims))
        norm = [_norm_dim(d, nd) for d in dims]
        if len(norm) != nd or any(d is None for d in norm) or sorted(norm) != list(range(nd)):  # type: ignore[type-var]
            return None
        return tuple(norm)  # type: ignore[arg-type]
    d0 = _norm_dim(_arg(node, 1, "dim0"), nd)
    d1 = _norm_dim(_arg(node, 2, "dim1"), nd)
    if d0 is None or d1 is None:
        return None
    perm = list(range(nd))
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return tuple(perm)


def _swaps(node: Node, ndim: int, a: int, b: int) -> bool:
    """``node`` swaps dims ``a`` and ``b`` of an ``ndim``-D tensor and nothing else."""
    perm = _permutation(node)
    if perm is None or len(perm) != ndim:
        return False
    expected = list(range(ndim))
    expected[a], expected[b] = expected[b], expected[a]
    return perm == tuple(expected)


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
        if (isinstance(chunk, Node) and ops.is_call(chunk, {torch.chunk}, {"chunk"}) and i in (0, 1)
                and _arg(chunk, 1, "chunks") == 2 and isinstance(chunk.args[0], Node)):
            shape = _shape(chunk.args[0])
            if shape is not None and _norm_dim(_arg(chunk, 2, "dim", 0), len(shape)) == len(shape) - 1:
                return chunk.args[0], i, [node, chunk]
    return None


def _depends_on(node: Any, target: Node) -> bool:
    """Whether ``node`` is computed from ``target`` (an ancestor search)."""
    if not isinstance(node, Node):
        return False
    seen: set[Node] = set()
    stack = [node]
    while stack:
        cur = stack.pop()
        if cur is target:
            return True
        if cur in seen:
            continue
        seen.add(cur)
        stack.extend(_node_args(cur))
    return False


# --- RoPE ------------------------------------------------------------------------------------------

@dataclass
class _Rope:
    source: Node  # the tensor RoPE is applied to
    kind: str  # "half" | "interleaved"
    rotary_dim: int
    nodes: list[Node]


def _rotate_half(rot: Node) -> tuple[Node, list[Node]] | None:
    """``cat((-x2, x1), -1)`` with x1/x2 the two halves of x: (x, nodes)."""
    if not ops.is_call(rot, CAT_FNS):
        return None
    tensors = _arg(rot, 0, "tensors")
    shape = _shape(rot)
    if not isinstance(tensors, (tuple, list)) or len(tensors) != 2 or shape is None:
        return None
    if _norm_dim(_arg(rot, 1, "dim", 0), len(shape)) != len(shape) - 1:
        return None
    second = _negated(tensors[0])
    h2, h1 = _half(second), _half(tensors[1])
    if h1 is None or h2 is None or h1[0] is not h2[0] or (h1[1], h2[1]) != (0, 1):
        return None
    return h1[0], [rot, tensors[0], *h1[2], *h2[2]]


def _rotate_interleaved(rot: Node) -> tuple[Node, list[Node]] | None:
    """``stack((-x[..., 1::2], x[..., ::2]), -1).flatten(-2)`` (or a reshape back to x's shape)."""
    if not ops.is_call(rot, VIEW_FNS, VIEW_METHODS) or not isinstance(_input(rot), Node):
        return None
    stack = _input(rot)
    if not ops.is_call(stack, STACK_FNS):
        return None
    tensors = _arg(stack, 0, "tensors")
    st_shape = _shape(stack)
    if not isinstance(tensors, (tuple, list)) or len(tensors) != 2 or st_shape is None:
        return None
    if _norm_dim(_arg(stack, 1, "dim", 0), len(st_shape)) != len(st_shape) - 1:
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
    if not ops.is_call(node, CAT_FNS):
        return None
    tensors = _arg(node, 0, "tensors")
    shape = _shape(node)
    if not isinstance(tensors, (tuple, list)) or len(tensors) != 2 or shape is None:
        return None
    if _norm_dim(_arg(node, 1, "dim", 0), len(shape)) != len(shape) - 1 or not isinstance(tensors[0], Node):
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


# --- attention sites -------------------------------------------------------------------------------

@dataclass
class _Site:
    """One attention op and where each of its operands is consumed."""

    node: Node  # the op whose output is the attention output (SDPA, or the eager P @ V matmul)
    query: Any
    key: Any
    value: Any
    q_user: Node
    k_user: Node
    v_user: Node
    enable_gqa: bool = False
    mask: Any = None


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
        if ops.is_call(node, MASKED_FILL_FNS, MASKED_FILL_METHODS):
            masks.append(_arg(node, 1, "mask"))
            node = _input(node)
            continue
        if ops.is_call(node, SOFTCAP_FNS, SOFTCAP_METHODS):  # Gemma2's c * tanh(s / c)
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
    if not ops.is_call(probs, SOFTMAX_FNS, SOFTMAX_METHODS):
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
    seen: set[Node] = set()
    stack = [mask]
    while stack:
        cur = stack.pop()
        if cur in seen:
            continue
        seen.add(cur)
        if cur.op == "placeholder":
            shape = _shape(cur)
            if "attention_mask" in cur.name.lower() and shape is not None and len(shape) == 2:
                return cur
            continue
        stack.extend(_node_args(cur))
    return None


# --- tracing operands back to units ------------------------------------------------------------------

class _NotAttn(Exception):
    def __init__(self, reason: str, where: Node | None = None, unit: LoraUnit | None = None,
                 split: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.where = where.name if where is not None else ""
        self.unit = unit
        self.split = split


@dataclass
class _Side:
    """One attention operand proven to be a head view of one unit's output."""

    unit: LoraUnit
    heads: int  # heads at the projection (its view to [B, T, H, D])
    head_dim: int
    op_heads: int  # heads at the attention operand (after a GQA repeat)
    rope: _Rope | None
    nodes: list[Node] = field(default_factory=list)  # unit output .. operand
    cache: Node | None = None
    shared: list[Node] = field(default_factory=list)  # fused unit output .. its split: read by every part


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


def _is_empty_const(node: Any) -> bool:
    """A constant empty tensor built in the graph (HF's ``torch.tensor([])`` cache seed)."""
    if not isinstance(node, Node):
        return False
    val = ops.example_value(node)
    if not isinstance(val, torch.Tensor) or val.numel() != 0:
        return False
    if node.op == "get_attr":
        return True
    return ops.is_call(node, EMPTY_CONST_FNS) and not _node_args(node)


def _cache_cat(node: Node, seq_dim: int) -> Node | None:
    """``torch.cat([empty, x], dim=seq)`` (the KV cache HF concatenates even in training): x."""
    if not ops.is_call(node, CAT_FNS):
        return None
    tensors = _arg(node, 0, "tensors")
    shape = _shape(node)
    if not isinstance(tensors, (tuple, list)) or len(tensors) != 2 or shape is None:
        return None
    if _norm_dim(_arg(node, 1, "dim", 0), len(shape)) != seq_dim:
        return None
    empty, x = tensors
    if not _is_empty_const(empty) or not isinstance(x, Node) or not _same_shape(_shape(x), shape):
        return None
    return x


def _repeat_kv(node: Node) -> tuple[Node, int, list[Node]] | None:
    """HF ``repeat_kv``: ``x[:, :, None].expand(B, Hkv, n, T, D).reshape(B, Hkv*n, T, D)``, or
    ``x.repeat_interleave(n, dim=1)``: (x, n, nodes)."""
    if ops.is_call(node, REPEAT_INTERLEAVE_FNS, REPEAT_INTERLEAVE_METHODS):
        x = _input(node)
        repeats = _arg(node, 1, "repeats")
        shape = _shape(x)
        if (isinstance(x, Node) and shape is not None and len(shape) == 4 and _static(repeats) is not None
                and _norm_dim(_arg(node, 2, "dim"), 4) == 1):
            return x, repeats, [node]
        return None
    if not ops.is_call(node, VIEW_FNS, VIEW_METHODS) or not isinstance(_input(node), Node):
        return None
    expand = _input(node)
    if not ops.is_call(expand, methods=EXPAND_METHODS) or not isinstance(_input(expand), Node):
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
    elif ops.is_call(unsq, {torch.unsqueeze}, {"unsqueeze"}) and _norm_dim(_arg(unsq, 1, "dim"), 5) == 2:
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
    if ops.is_call(src, SPLIT_FNS, SPLIT_METHODS):
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
            if ops.is_call(cur, NORM_FNS) and tuple(_arg(cur, 1, "normalized_shape", ())) == (head_dim,):
                return True
            if (ops.is_call(cur, REDUCE_FNS, REDUCE_METHODS) and shape is not None and len(shape) >= 3
                    and _static(shape[-1]) == head_dim
                    and _norm_dim(_arg(cur, 1, "dim"), len(shape)) == len(shape) - 1):
                return True
            nxt.extend(_node_args(cur))
        frontier = nxt
    return False


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
        if layout == "bthd" and ops.is_call(cur, VIEW_FNS, VIEW_METHODS) and isinstance(_input(cur), Node):
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
        if layout == "bthd" and ops.is_call(nxt, VIEW_FNS, VIEW_METHODS):
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


# --- containment ------------------------------------------------------------------------------------

def _only_returned(user: Node, cache: Node) -> bool:
    """``user`` hands the KV cache back to the caller: the graph output, or a slice over tokens only
    (a sliding-window cache keeps the last ``window - 1`` tokens) that goes only there."""
    if user.op == "output":
        return True
    if user.op != "call_function" or user.target is not operator.getitem or user.args[0] is not cache:
        return False
    before, after = _shape(cache), _shape(user)
    if before is None or after is None or len(before) != len(after) or not _same_dim(before[-1], after[-1]):
        return False
    return bool(user.users) and all(_only_returned(u, user) for u in user.users)


def _check_side_contained(s: _Side, consumer: Node, name: str) -> None:
    """Every user of the path's nodes stays on the path (the cache may also be returned)."""
    inside = set(s.nodes)
    for node in s.nodes:
        for user in node.users:
            if user in inside or user is consumer:
                continue
            if node is s.cache and _only_returned(user, node):
                continue
            raise _NotAttn(f"the {name} path's `{node.name}` is also used by `{user.name}` outside the attention",
                           user, s.unit)


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


# --- grouping -----------------------------------------------------------------------------------------

def _free(unit: LoraUnit) -> None:
    if unit.role:
        raise _NotAttn(f"`{unit.fqn}` is already grouped (role {unit.role!r})", unit.output, unit)


def _gqa_ok(heads: int, op_heads: int, kv_heads: int, enable_gqa: bool) -> bool:
    if kv_heads <= 0 or heads % kv_heads:
        return False
    return op_heads == heads or op_heads == 1 or (enable_gqa and heads % op_heads == 0)


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


def _try(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except _NotAttn as err:
        return err


def _skip(skipped: list[Skipped], unit: LoraUnit | None, reason: str, where: str, name: str | None = None) -> None:
    """Record why ``unit`` (or, with ``name``, one part of it: ``qkv_proj[v]``) is not grouped, once."""
    if unit is None:
        return
    name = unit.fqn if name is None else name
    if any(s.name == name and s.reason == reason for s in skipped):
        return
    skipped.append(Skipped(name, reason, where))


def _check_fused_sides(results: list[Any]) -> list[Any]:
    """Sides that are parts of a fused projection, kept only when the fused output is read through
    its pieces alone: the rewrite computes the union of the kept rows, so any other reader of the
    fused output (or of the view/split between) would see dropped rows as zeros."""
    sides = [r for r in results if isinstance(r, _Side) and r.unit.part is not None]
    out = list(results)
    for side in sides:
        part = side.unit.part
        family = [s for s in sides if s.unit.part.parent is part.parent]  # type: ignore[union-attr]
        shared = {n for s in family for n in s.shared}
        traced = {s.unit.part.piece: s.unit.part for s in family}  # type: ignore[union-attr]
        for node in shared:
            for user in node.users:
                if user in shared or user in traced:
                    continue
                other = last_dim_piece(user)
                if other is not None and other[0] in shared and not any(
                        other[1] < p.offset % p.period + p.block and p.offset % p.period < other[2]
                        for p in traced.values() if p.block != p.width) and not any(
                        other[1] < p.offset + p.width and p.offset < other[2]
                        for p in traced.values() if p.block == p.width):
                    continue  # an untraced part: its rows stay dense
                out[results.index(side)] = _NotAttn(
                    f"the fused projection `{part.parent.fqn}` is also read by `{user.name}`, not through "
                    "its q/k/v pieces", user, part.parent)
                break
            else:
                continue
            break
    return out


def _site_groups(site: _Site, by_output: dict[Node, LoraUnit], by_input: dict[Node, list[LoraUnit]],
                 groups: list[Group], skipped: list[Skipped]) -> None:
    q = _try(_trace_operand, site.query, "q", by_output)
    k = _try(_trace_operand, site.key, "k", by_output)
    v = _try(_trace_operand, site.value, "v", by_output)
    out = _try(_trace_output, site, by_input)
    mask = _padding_mask(site.mask)

    def unit_of(res: Any) -> LoraUnit | None:
        return res.unit if isinstance(res, (_Side, _NotAttn)) else res[0]

    q, k, v = _check_fused_sides([q, k, v])

    fused: set[int] = set()
    for res in (q, k, v):
        if isinstance(res, _NotAttn) and res.split and res.unit is not None:
            others = [unit_of(r) for r in (q, k, v) if r is not res]
            if any(u is res.unit for u in others):
                res.reason = FUSED_REASON
                fused.add(id(res.unit))

    # fused projections another operand reached a part of: a failure on one is that side's part
    split_parents = {id(r.unit.part.parent) for r in (q, k, v) if isinstance(r, _Side) and r.unit.part is not None}

    def report(err: _NotAttn, prefix: str, units: list[LoraUnit | None], side: str = "") -> None:
        for unit in [err.unit, *units]:
            if unit is None:
                continue
            reason = FUSED_REASON if (err.reason == FUSED_REASON or id(unit) in fused) else f"{prefix}: {err.reason}"
            name = f"{unit.fqn}[{side}]" if side and id(unit) in split_parents else None
            _skip(skipped, unit, reason, err.where, name)

    # q/k
    if isinstance(q, _NotAttn) or isinstance(k, _NotAttn):
        err = q if isinstance(q, _NotAttn) else k
        if err.unit is not None or any(isinstance(r, _Side) for r in (q, k)):
            report(err, "attention q/k not grouped", [unit_of(r) for r in (q, k)], "q" if err is q else "k")
    else:
        res = _try(_group_qk, site, q, k, mask)
        if isinstance(res, Group):
            groups.append(res)
        else:
            report(res, "attention q/k not grouped", [q.unit, k.unit])
    # v/o
    if isinstance(v, _NotAttn) or isinstance(out, _NotAttn):
        err = v if isinstance(v, _NotAttn) else out
        o_unit = unit_of(out)
        if isinstance(v, _NotAttn) and v.reason == FUSED_REASON and o_unit is not None:
            _skip(skipped, o_unit, FUSED_REASON, v.where)
        if err.unit is not None or isinstance(v, _Side) or not isinstance(out, _NotAttn):
            report(err, "attention v/o not grouped", [unit_of(v), o_unit], "v" if err is v else "")
    else:
        res = _try(_group_vo, site, v, out, mask)
        if isinstance(res, Group):
            groups.append(res)
        else:
            report(res, "attention v/o not grouped", [v.unit, out[0]])


def find_attention_groups(units: list[LoraUnit]) -> tuple[list[Group], list[Skipped]]:
    """``attn_qk`` [q, k] and ``attn_vo`` [v, o] groups, proven per attention op from the dataflow.

    Each graph scope the units live in is searched for SDPA and eager attention ops; each operand is
    walked back to the unit it is a head view of. A group's units share the attention op's scope.
    Units already carrying a role (grouped elsewhere) are not regrouped. Fused q/k/v projections and
    paths with ops this pass cannot prove head-preserving are returned in ``skipped``.
    """
    groups: list[Group] = []
    skipped: list[Skipped] = []
    scopes: dict[int, Any] = {}
    for unit in units:
        scopes.setdefault(id(unit.scope), unit.scope)
    for scope in scopes.values():
        members = [u for u in units if u.scope is scope]
        by_output = {u.output: u for u in members}
        by_input: dict[Node, list[LoraUnit]] = {}
        for u in members:
            by_input.setdefault(u.input, []).append(u)
        for site in _find_sites(scope.gm.graph.nodes):
            _site_groups(site, by_output, by_input, groups, skipped)
    log.debug("attention: %d groups, %d skipped", len(groups), len(skipped))
    return groups, skipped
