"""What every attention module shares: the records passed between them and small graph helpers.

``_Site`` is one attention op, ``_Side`` one operand proven to be a head view of a unit, ``_Rope``
the RoPE found on a q/k path, ``_NotAttn`` a failed proof (with the node that stopped it). The
helpers read shapes and arguments without creating guards.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch.fx import Node

from ... import graph_ops as ops
from ..groups import Skipped
from ..units import LoraUnit

FUSED_REASON = ("fused projection (qkv in one weight) split in a way this pass cannot map to weight rows "
                "(only last-dim chunk/split/slices, flat or per head, are); it runs dense")
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


def _ancestors(node: Node) -> Iterator[Node]:
    """``node`` and every node it is computed from, each once (depth first)."""
    seen: set[Node] = set()
    stack = [node]
    while stack:
        cur = stack.pop()
        if cur in seen:
            continue
        seen.add(cur)
        yield cur
        stack.extend(_node_args(cur))


def _pair_along(node: Node, fns: Any, dim: int | None = None) -> tuple[Any, Any] | None:
    """The two tensors of ``cat``/``stack((a, b), dim)`` (``fns`` says which; ``dim`` None: the
    last dim of the result), else None."""
    if not ops.is_call(node, fns):
        return None
    tensors = _arg(node, 0, "tensors")
    shape = _shape(node)
    if not isinstance(tensors, (tuple, list)) or len(tensors) != 2 or shape is None:
        return None
    want = len(shape) - 1 if dim is None else dim
    if _norm_dim(_arg(node, 1, "dim", 0), len(shape)) != want:
        return None
    return tensors[0], tensors[1]


def _is_scalar_scale(node: Node) -> Node | None:
    """``x * c``, ``c * x`` or ``x / c`` with a scalar ``c``: the tensor ``x`` (channels stay put)."""
    if ops.is_call(node, ops.MUL_FNS, ops.MUL_METHODS) and len(node.args) == 2 and not node.kwargs:
        lhs, rhs = node.args
        if ops.is_scalar_like(rhs) and isinstance(lhs, Node) and not ops.is_scalar_like(lhs):
            return lhs
        if ops.is_scalar_like(lhs) and isinstance(rhs, Node) and not ops.is_scalar_like(rhs):
            return rhs
    if ops.is_call(node, ops.DIV_FNS, ops.DIV_METHODS) and len(node.args) == 2 and not node.kwargs:
        lhs, rhs = node.args
        if ops.is_scalar_like(rhs) and isinstance(lhs, Node) and not ops.is_scalar_like(lhs):
            return lhs
    return None


def _is_passthrough(node: Node) -> bool:
    return ops.is_dtype_cast(node) or ops.is_dropout(node) or ops.is_call(node, methods=ops.CONTIGUOUS_METHODS)


def _is_identity_view(node: Node) -> bool:
    """A view/reshape whose result has the input's shape (HF's ``reshape(B, -1, T, D)`` no-ops)."""
    return (ops.is_call(node, ops.VIEW_FNS, ops.VIEW_METHODS) and isinstance(_input(node), Node)
            and _same_shape(_shape(node), _shape(_input(node))))


def _permutation(node: Node) -> tuple[int, ...] | None:
    """The dimension permutation a transpose/permute applies, or None."""
    if not ops.is_call(node, ops.TRANSPOSE_FNS, ops.TRANSPOSE_METHODS) or not isinstance(_input(node), Node):
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


# --- records ---------------------------------------------------------------------------------------

@dataclass
class _Rope:
    source: Node  # the tensor RoPE is applied to
    kind: str  # "half" | "interleaved"
    rotary_dim: int
    nodes: list[Node]


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


# --- containment and reporting ------------------------------------------------------------------------

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


def _free(unit: LoraUnit) -> None:
    if unit.role:
        raise _NotAttn(f"`{unit.fqn}` is already grouped (role {unit.role!r})", unit.output, unit)


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
