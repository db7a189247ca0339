"""Write the plan into the graph: estimator -> top-k -> gather ops, per group.

Only the frozen base linears change (and, in MLPs, the LoRA rows/columns of dropped channels):
MLP gate/up (fc1) compute the kept rows, the intermediate narrows to ``[tokens, keep]``, down (fc2)
reads the kept columns; q/k/v compute the kept channels scattered into their full-width output;
o reads the kept input channels. New nodes get ``meta["example_value"]`` from fake propagation.

With ``tokens = "output_dense"`` (see ``tokens.py``) each group also splits its tokens: the dense
ones (output tokens first) run the original ops, the rest the sparse ones, and both are written
back by index. An MLP group runs twice (its whole sub-graph on each token set, since the
intermediate differs in width); attention splits each frozen projection, its LoRA stays as is.
"""

from __future__ import annotations

import logging
import operator
import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.fx import Graph, GraphModule, Node

from .analyse.groups import Group, Skipped
from .plan import GroupPlan, Plan
from .tokens import Budget, TokenSplit, drop_markers, find_output_tokens, insert_token_split, merge_rows, take_rows
from .analyse.units import FusedPart, LoraUnit, Scope
from .factors import GraphFactors
from .weights import real_weights

log = logging.getLogger("sparselora_fx")


class CannotRewrite(Exception):
    """A group the rewrite cannot handle: it stays dense, with one warning naming it."""


def _ops() -> Any:
    """The custom op namespace, registered by importing the runtime modules."""
    from ..runtime import ops as _runtime_ops  # noqa: F401  (registers sparselora::*_linear*)
    from ..runtime import selection as _selection  # noqa: F401  (registers sparselora::select_*)

    return torch.ops.sparselora


def _order(graph: Graph) -> dict[Node, int]:
    return {n: i for i, n in enumerate(graph.nodes)}


def _oriented(graph: Graph, unit: LoraUnit) -> tuple[Node, Node | None]:
    """The frozen weight as ``[out, in]`` (a ``t()`` view for weights stored pre-transposed, Conv1D)
    and the frozen bias, as the sparse ops read them.

    For a part of a fused projection: the part's rows of the fused weight and of its bias (slice
    views, or for a per-head interleaved part a gather of its rows).
    """
    w = unit.weight if not unit.base.weight_transposed else graph.call_method("t", (unit.weight,))
    b = unit.base.bias
    part = unit.part
    if part is None:
        return w, b
    return _part_rows_of(graph, part, w), (_part_rows_of(graph, part, b) if b is not None else None)


def _part_rows_of(graph: Graph, part: FusedPart, t: Node) -> Node:
    """``t``'s rows (dim 0) that belong to ``part``: ``t[offset:offset + width]`` for a contiguous
    part, else ``t.unflatten(0, (-1, period))[:, offset:offset + block].flatten(0, 1)``."""
    if part.block == part.width:
        return graph.call_function(operator.getitem, (t, slice(part.offset, part.offset + part.width)))
    grouped = graph.call_function(torch.unflatten, (t, 0, (-1, part.period)))
    rows = graph.call_function(operator.getitem, (grouped, (slice(None), slice(part.offset, part.offset + part.block))))
    return graph.call_function(torch.flatten, (rows, 0, 1))


def _selection_bias(graph: Graph, unit: LoraUnit, b: Node | None) -> Node | None:
    """The bias the selection op scores with: ``b`` (the linear's own) plus every bias added after
    the frozen product (``unit.post``), so ``y = x @ W.T; y = y + b`` selects as ``F.linear(x, W, b)``.

    Built from the biases' graph inputs (a cast of one may be computed after the selection point),
    cast to the weight's dtype; a part of a fused projection takes its rows.
    """
    from . import graph_ops

    extra = [p.operand for p in unit.post if p.kind == "bias"]
    if not extra:
        return b
    dtype = getattr(graph_ops.example_value(unit.weight), "dtype", None)
    total = b
    for operand in extra:
        src = operand
        while graph_ops.is_dtype_cast(src):
            src = src.args[0]
        src_dtype = getattr(graph_ops.example_value(src), "dtype", dtype)
        if src.op == "get_attr":  # may sit after the selection point: read it again here
            src = graph.get_attr(src.target)
        if dtype is not None and src_dtype != dtype:
            src = graph.call_method("to", (src, dtype))
        if unit.part is not None:
            src = _part_rows_of(graph, unit.part, src)
        total = src if total is None else graph.call_function(torch.add, (total, src))
    return total


def _narrow_post(graph: Graph, unit: LoraUnit, rows: Node) -> None:
    """The product now holds only channels ``rows``: each ``[out]`` operand of the ops after it (a
    bias add, a per-channel scale) becomes ``operand[rows]``, so kept channels get the same values."""
    for p in unit.post:
        if p.vector:
            with graph.inserting_before(p.node):
                kept = graph.call_function(torch.index_select, (p.operand, 0, rows))
            p.node.replace_input_with(p.operand, kept)


def _masked(graph: Graph, vec: Node, idx: Node) -> Node:
    """``vec`` with every channel outside ``idx`` zero."""
    zeros = graph.call_function(torch.zeros_like, (vec,))
    return graph.call_method("index_copy", (zeros, 0, idx, graph.call_function(torch.index_select, (vec, 0, idx))))


def _scatter_base(graph: Graph, unit: LoraUnit, x: Any, w: Node, idx: Node, b: Node | None,
                  split: TokenSplit | None) -> None:
    """Swap the frozen product for its rows ``idx`` scattered to full width (dropped channels zero).

    The ops after the product (``unit.post``) stay exact: a bias added there is masked to the kept
    channels (a dropped channel stays zero, as when the bias sits inside ``rows_linear_scatter``);
    a scale or cast keeps zeros zero. Under a token split the dense tokens need the whole bias, so
    the post ops are copied into each token set's computation.
    """
    ops = _ops()
    biased = [p for p in unit.post if p.kind == "bias"]
    if split is not None and biased:
        last = unit.post[-1].node

        def chain(y: Node, mask: bool) -> Node:
            prev = unit.base.node
            for p in unit.post:
                operand = _masked(graph, p.operand, idx) if mask and p.kind == "bias" else p.operand
                y = graph.node_copy(p.node, lambda a, prev=prev, y=y, p=p, operand=operand:
                                    y if a is prev else (operand if a is p.operand else a))
                prev = p.node
            return y

        with graph.inserting_before(last):
            new = _split_linear(graph, split, x, lambda r: chain(graph.call_function(F.linear, (r, w, b)), False),
                                lambda r: chain(graph.call_function(ops.rows_linear_scatter.default,
                                                                    (r, w, idx, b)), True))
        last.replace_all_uses_with(new)
        for p in reversed(unit.post):
            graph.erase_node(p.node)
        graph.erase_node(unit.base.node)
        for node in reversed(unit.base.inner):
            if not node.users:
                graph.erase_node(node)
        return
    with graph.inserting_before(unit.base.node):
        if split is None:
            new = graph.call_function(ops.rows_linear_scatter.default, (x, w, idx, b))
        else:
            new = _split_linear(graph, split, x, lambda r: graph.call_function(F.linear, (r, w, b)),
                                lambda r: graph.call_function(ops.rows_linear_scatter.default, (r, w, idx, b)))
    _replace_base(unit, new)
    for p in biased:
        with graph.inserting_before(p.node):
            kept = _masked(graph, p.operand, idx)
        p.node.replace_input_with(p.operand, kept)


def _fused_rows(graph: Graph, part: FusedPart, idx: Node) -> Node:
    """Part channel indices -> fused weight rows: ``(idx // block) * period + offset + idx % block``."""
    if part.block == part.width:
        return graph.call_function(operator.add, (idx, part.offset))
    head = graph.call_function(operator.mul, (graph.call_function(operator.floordiv, (idx, part.block)), part.period))
    within = graph.call_function(operator.mod, (idx, part.block))
    return graph.call_function(operator.add, (graph.call_function(operator.add, (head, within)), part.offset))


class FusedRewrites:
    """Kept rows per fused projection, gathered from every group that reads one of its parts.

    Why: q, k and v of one ``qkv_proj`` live in different groups (Q/K, V/O), each with its own
    kept set, but the frozen GEMM is one; after every group has chosen, ``finish`` computes only
    the union of the kept rows with one ``rows_linear_scatter`` (dropped rows are zeros, as for an
    unfused q/k/v), and parts no group chose for (dense by policy) keep all their rows.
    """

    def __init__(self) -> None:
        self.chosen: dict[int, list[tuple[FusedPart, Node]]] = {}
        self.splits: dict[int, TokenSplit | None] = {}

    def add(self, unit: LoraUnit, idx: Node, split: TokenSplit | None = None) -> None:
        """Record that ``unit`` (a part) keeps its channels ``idx``; nothing is rewritten until ``finish``.

        ``split`` (``tokens = "output_dense"``): the dense tokens of the fused GEMM compute every row.
        """
        part = unit.part
        assert part is not None
        with unit.graph_module.graph.inserting_before(unit.base.node):
            rows = _fused_rows(unit.graph_module.graph, part, idx)
        self.chosen.setdefault(id(part.parent), []).append((part, rows))
        self.splits[id(part.parent)] = split

    def finish(self, skipped: list[Skipped]) -> None:
        """Replace each recorded fused GEMM by one that computes the union of its parts' kept rows.

        Call once, after every group's rewriter ran; a fused projection whose parts overlap stays
        dense (appended to ``skipped`` with the reason).
        """
        for key, chosen in self.chosen.items():
            parent = chosen[0][0].parent
            graph = parent.graph_module.graph
            rows_taken = [r for part, _ in chosen for r in part.rows()]
            if len(set(rows_taken)) != len(rows_taken):  # grouping rules this out; never guess
                warnings.warn(f"sparselora: {parent.fqn}: its parts overlap, so its frozen GEMM stays dense",
                              stacklevel=3)
                skipped.append(Skipped(parent.fqn, "fused projection whose parts overlap: its GEMM stays dense"))
                continue
            rest = sorted(set(range(parent.out_features)) - set(rows_taken))
            device = _example_device(parent)
            split = self.splits.get(key)
            with graph.inserting_before(parent.base.node):
                pieces = [rows for _, rows in chosen]
                if rest:
                    pieces.append(graph.call_function(torch.tensor, (rest,), {"dtype": torch.int64, "device": device}))
                idx = graph.call_function(torch.cat, (pieces,))
                idx = graph.call_function(operator.getitem, (graph.call_function(torch.sort, (idx,)), 0))
                w, b = _oriented(graph, parent)
                x = _compute_input(parent)
            _scatter_base(graph, parent, x, w, idx, b, split)


def _example_device(unit: LoraUnit) -> torch.device:
    from . import graph_ops

    val = graph_ops.example_value(unit.weight)
    return val.device if isinstance(val, torch.Tensor) else torch.device("cpu")


def _replace(old: Node, new: Node) -> None:
    old.replace_all_uses_with(new)
    old.graph.erase_node(old)


def _replace_base(unit: LoraUnit, new: Node) -> None:
    """Swap the frozen linear for ``new``; the nodes of its spelling (Conv1D's views) go with it."""
    _replace(unit.base.node, new)
    for node in reversed(unit.base.inner):
        if not node.users:
            node.graph.erase_node(node)


def _slice_lora(graph: Graph, unit: LoraUnit, idx: Node, side: str) -> None:
    """MLP LoRA follows the kept channels: ``B[S]`` on the out side, ``A[:, S]`` on the in side."""
    for branch in unit.branches:
        call = branch.b if side == "out" else branch.a
        with graph.inserting_before(call.node):
            if side == "out":
                dim = 1 if call.weight_transposed else 0
            else:
                dim = 0 if call.weight_transposed else 1
            w = graph.call_function(torch.index_select, (call.weight, dim, idx))
            if call.weight_transposed:
                new = graph.call_function(torch.matmul, (call.input, w))
            else:
                new = graph.call_function(F.linear, (call.input, w))
        _replace(call.node, new)


def _compute_input(unit: LoraUnit) -> Any:
    """What the base linear reads now (a token split rewires it from ``unit.base.input``)."""
    return unit.base.reader.args[0]


def _split_linear(graph: Graph, split: TokenSplit, x: Any, dense: Callable[[Node], Node],
                  sparse: Callable[[Node], Node]) -> Node:
    """``dense`` on the dense tokens' rows of ``x``, ``sparse`` on the rest, merged back by index."""
    rows_d = graph.call_function(take_rows, (x, split.dense_idx))
    rows_s = graph.call_function(take_rows, (x, split.sparse_idx))
    return graph.call_function(merge_rows, (x, split.dense_idx, dense(rows_d), split.sparse_idx, sparse(rows_s)))


def _region(x: Node, out: Node, order: dict[Node, int]) -> list[Node]:
    """The nodes that read ``x`` (directly or not) and feed ``out``, in graph order."""
    down: set[Node] = set()
    stack = list(x.users)
    while stack:
        n = stack.pop()
        if n in down or order[n] > order[out]:
            continue
        down.add(n)
        stack.extend(n.users)
    up: set[Node] = set()
    stack = [out]
    while stack:
        n = stack.pop()
        if n in up or n not in down:
            continue
        up.add(n)
        stack.extend(n.all_input_nodes)
    return sorted(up, key=order.__getitem__)


def _split_mlp_tokens(group: Group, split: TokenSplit) -> None:
    """Copy the MLP's sub-graph for the dense tokens; point the original at the sparse tokens.

    The original nodes (which the units describe) are then rewritten sparse as in all_sparse mode.
    """
    first, down = group.units[0], group.units[-1]
    graph = first.scope.gm.graph
    x, out = first.base.input, down.output
    order = _order(graph)
    if not isinstance(x, Node) or not split.covers(x):
        raise CannotRewrite("its input's tokens are not the output-token mask's tokens")
    region = _region(x, out, order)
    inside = set(region)
    for n in region:
        if n is not out and any(u not in inside for u in n.users):
            raise CannotRewrite(f"`{n.name}` inside the MLP is also used outside it, so its tokens cannot be split")
    with graph.inserting_before(region[0]):
        rows_s = graph.call_function(take_rows, (x, split.sparse_idx))
    # The copy goes just before ``out``: values the region reads from outside it (a LoRA scale's
    # ``.item()`` under dynamic shapes) may be defined between its nodes.
    # Conv1D's closing ``view(*x.shape[:-1], out)`` holds the full batch's sizes; on the dense rows
    # (already ``[tokens, out]`` out of its addmm) it is the identity, so the copy skips it.
    unflatten = {u.base.node: u.base.inner[-1] for u in group.units if u.base.inner}
    with graph.inserting_before(out):
        rows_d = graph.call_function(take_rows, (x, split.dense_idx))
        env: dict[Node, Node] = {x: rows_d}
        for n in region:
            if n in unflatten and unflatten[n] in env:
                env[n] = env[unflatten[n]]
            else:
                env[n] = graph.node_copy(n, lambda a: env.get(a, a))
    for n in region:
        n.replace_input_with(x, rows_s)
    with graph.inserting_after(out):
        merged = graph.call_function(merge_rows, (x, split.dense_idx, env[out], split.sparse_idx, out))
    out.replace_all_uses_with(merged, delete_user_cb=lambda user: user is not merged)


def _estimator_args(gp: GroupPlan) -> tuple[str, int, int, int, float]:
    return gp.estimator.op_args()


def _factor_args(gp: GroupPlan, factors: GraphFactors | None, *units: LoraUnit | None) -> tuple[Node | None, ...]:
    """The select op's factor arguments: the graph's P, Q nodes of each estimated unit (SVD with
    values at compile time), else Nones (the op looks them up at run time)."""
    n = 2 * sum(u is not None for u in units)
    if factors is None or gp.estimator.kind != "svd":
        return (None,) * n
    return tuple(factors.nodes_for(list(units), gp.estimator.rank))


def _rewrite_mlp(gp: GroupPlan, mask: Node | None, split: TokenSplit | None = None,
                 factors: GraphFactors | None = None) -> None:
    group = gp.group
    ops = _ops()
    if group.kind == "gated_mlp":
        first, second, down = group.units
    else:
        (first, down), second = group.units, None
    graph = first.scope.gm.graph
    up_side = [u for u in (first, second) if u is not None]
    order = _order(graph)
    anchor = min((u.base.node for u in up_side), key=order.__getitem__)
    x = first.base.input
    if second is not None and second.base.input is not x:
        raise CannotRewrite("gate and up read different inputs")
    if (first.part is None) != (second is None or second.part is None) or (
            second is not None and first.part is not None and second.part.parent is not first.part.parent):
        raise CannotRewrite("gate and up are not the two halves of one fused projection")
    if split is not None:
        _split_mlp_tokens(group, split)
    with graph.inserting_before(anchor):
        w1, b1 = _oriented(graph, first)
        w2, b2 = _oriented(graph, second) if second is not None else (None, None)
        s1 = _selection_bias(graph, first, b1)
        s2 = _selection_bias(graph, second, b2) if second is not None else None
        idx = graph.call_function(
            ops.select_mlp.default,
            (x, w1, s1, w2, s2, mask, gp.keep, group.act, *_estimator_args(gp),
             *_factor_args(gp, factors, first, second)),
        )
    if first.part is not None:
        _rows_fused_mlp(graph, [u for u in (first, second) if u is not None], idx, gp.keep)
    for unit, w, b in ((first, w1, b1), (second, w2, b2)):
        if unit is None or unit.part is not None:
            continue
        with graph.inserting_before(unit.base.node):
            new = graph.call_function(ops.rows_linear.default, (_compute_input(unit), w, idx, b))
        _replace_base(unit, new)
        _narrow_post(graph, unit, idx)
        _slice_lora(graph, unit, idx, "out")
    with graph.inserting_before(down.base.node):
        wd, bd = _oriented(graph, down)
        new = graph.call_function(ops.cols_linear.default, (down.base.input, wd, idx))
        if bd is not None:
            new = graph.call_function(torch.add, (new, bd))
    _replace_base(down, new)
    _slice_lora(graph, down, idx, "in")


def _rows_fused_mlp(graph: Graph, parts: list[LoraUnit], idx: Node, keep: int) -> None:
    """A fused gate_up computes rows ``[idx, idx + I]`` (its LoRA B the same rows); the pieces it
    was chunked into are re-split to ``keep`` columns each."""
    ops = _ops()
    parts = sorted(parts, key=lambda u: u.part.offset)  # type: ignore[union-attr]
    parent = parts[0].part.parent  # type: ignore[union-attr]
    with graph.inserting_before(parent.base.node):
        rows = graph.call_function(torch.cat, ([_fused_rows(graph, u.part, idx) for u in parts],))  # type: ignore[arg-type]
        w, b = _oriented(graph, parent)
        new = graph.call_function(ops.rows_linear.default, (_compute_input(parent), w, rows, b))
    _replace_base(parent, new)
    _narrow_post(graph, parent, rows)
    _slice_lora(graph, parent, rows, "out")
    old_splits = {u.part.piece.args[0] for u in parts} - {parent.output}  # type: ignore[union-attr]
    with graph.inserting_after(parent.output):
        pieces = graph.call_function(torch.split, (parent.output, [keep] * len(parts), -1))
    with graph.inserting_after(pieces):
        for i, unit in enumerate(parts):
            piece = graph.call_function(operator.getitem, (pieces, i))
            _replace(unit.part.piece, piece)  # type: ignore[union-attr]
            unit.part.piece = unit.output = piece  # type: ignore[union-attr]
    for node in old_splits:
        if not node.users:
            graph.erase_node(node)


def _rewrite_vo(gp: GroupPlan, mask: Node | None, split: TokenSplit | None = None,
                fused: FusedRewrites | None = None, factors: GraphFactors | None = None) -> None:
    group = gp.group
    ops = _ops()
    v, o = group.units
    graph = v.scope.gm.graph
    _check_covers(split, v.base.input, o.base.input)
    _check_fused(group, split, fused)
    with graph.inserting_before(v.base.node):
        wv, bv = _oriented(graph, v)
        sel = graph.call_function(
            ops.select_vo.default,
            (v.base.input, wv, _selection_bias(graph, v, bv), mask, gp.keep, group.num_heads, group.num_kv_heads,
             group.head_dim, *_estimator_args(gp), *_factor_args(gp, factors, v)),
        )
        idx_v = graph.call_function(operator.getitem, (sel, 0))
        idx_o = graph.call_function(operator.getitem, (sel, 1))
    if v.part is not None:
        fused.add(v, idx_v, split)  # type: ignore[union-attr]
    else:
        _scatter_base(graph, v, v.base.input, wv, idx_v, bv, split)
    with graph.inserting_before(o.base.node):
        wo, bo = _oriented(graph, o)
        if split is None:
            new_o = graph.call_function(ops.cols_linear_gather.default, (o.base.input, wo, idx_o))
        else:
            new_o = _split_linear(
                graph, split, o.base.input, lambda r: graph.call_function(F.linear, (r, wo)),
                lambda r: graph.call_function(ops.cols_linear_gather.default, (r, wo, idx_o)))
        if bo is not None:
            new_o = graph.call_function(torch.add, (new_o, bo))
    _replace_base(o, new_o)


def _rewrite_qk(gp: GroupPlan, mask: Node | None, split: TokenSplit | None = None,
                fused: FusedRewrites | None = None, factors: GraphFactors | None = None) -> None:
    group = gp.group
    ops = _ops()
    q, k = group.units
    graph = q.scope.gm.graph
    _check_covers(split, q.base.input, k.base.input)
    _check_fused(group, split, fused)
    order = _order(graph)
    anchor = min(q.base.node, k.base.node, key=order.__getitem__)
    for x in (q.base.input, k.base.input):
        if isinstance(x, Node) and order[x] >= order[anchor] and q.base is not k.base:
            raise CannotRewrite("the key input is computed after the query projection")
    # Without RoPE the plan counts every head dim as a (single-dim) rotary unit (plan.qk_units);
    # select_qk reads the same only when told rotary_dim = head_dim (rotary_dim 0 = pass-through).
    rotary_dim = group.rotary_dim if group.rope != "none" else group.head_dim
    with graph.inserting_before(anchor):
        wq, bq = _oriented(graph, q)
        wk, bk = _oriented(graph, k)
        sq, sk = _selection_bias(graph, q, bq), _selection_bias(graph, k, bk)
        sel = graph.call_function(
            ops.select_qk.default,
            (q.base.input, wq, sq, k.base.input, wk, sk, mask, gp.keep, gp.keep_pass, group.num_heads,
             group.num_kv_heads, group.head_dim, group.rope, rotary_dim, *_estimator_args(gp),
             *_factor_args(gp, factors, q, k)),
        )
        idx_q = graph.call_function(operator.getitem, (sel, 0))
        idx_k = graph.call_function(operator.getitem, (sel, 1))
    for unit, w, b, idx in ((q, wq, bq, idx_q), (k, wk, bk, idx_k)):
        if unit.part is not None:
            fused.add(unit, idx, split)  # type: ignore[union-attr]
            continue
        _scatter_base(graph, unit, unit.base.input, w, idx, b, split)


def _check_fused(group: Group, split: TokenSplit | None, fused: FusedRewrites | None) -> None:
    if not any(u.part is not None for u in group.units):
        return
    if fused is None:
        raise CannotRewrite("parts of a fused projection need the fused-rows pass (internal error)")


def _check_covers(split: TokenSplit | None, *inputs: Any) -> None:
    if split is not None and not all(isinstance(x, Node) and split.covers(x) for x in inputs):
        raise CannotRewrite("its inputs' tokens are not the output-token mask's tokens")


REWRITERS: dict[str, Callable[..., None]] = {
    "gated_mlp": _rewrite_mlp,
    "mlp": _rewrite_mlp,
    "attn_vo": _rewrite_vo,
    "attn_qk": _rewrite_qk,
}


def _check_finite(gp: GroupPlan, real: dict[Node, torch.Tensor]) -> None:
    """A frozen weight holding NaN/Inf has no usable estimator factors: its group stays dense."""
    for u in gp.group.units:
        w = real.get(u.weight)
        if w is not None and w.is_floating_point() and not bool(torch.isfinite(w).all()):
            raise CannotRewrite(f"the frozen weight of {u.fqn} holds NaN/Inf, so its estimator factors "
                                "would not be finite; fix or re-initialise that weight")


def _check(gp: GroupPlan, real: dict[Node, torch.Tensor] | None = None) -> None:
    """Refuse what the ops cannot express, before anything is changed."""
    group = gp.group
    scopes = {id(u.scope) for u in group.units}
    if len(scopes) != 1:
        raise CannotRewrite("its units live in different graph scopes")
    for u in group.units:
        w = u.weight.meta.get("example_value")
        if isinstance(w, torch.Tensor) and w.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            raise CannotRewrite(f"{u.fqn} has a {w.dtype} weight (quantized bases stay dense)")
    for u in group.units:
        scale = next((p for p in u.post if p.kind == "scale"), None)
        if scale is not None and u.role not in ("down", "fc2", "o"):
            raise CannotRewrite(
                f"{u.fqn}'s output is scaled by `{scale.node.name}` between its base product and its LoRA sum; "
                "the channel selection scores the unscaled product, so it could not pick the largest channels")
    if group.kind in ("attn_qk", "attn_vo") and not (group.num_heads and group.num_kv_heads and group.head_dim):
        raise CannotRewrite("the head layout was not read off the graph")
    if real:
        _check_finite(gp, real)


def _scope_mask(plan: Plan) -> dict[int, Node]:
    masks: dict[int, Node] = {}
    for gp in plan.groups:
        if gp.group.mask is not None:
            masks.setdefault(id(gp.group.units[0].scope), gp.group.mask)
    return masks


def _token_split(gm: GraphModule, plan: Plan, masks: dict[int, Node], skipped: list[Skipped]
                 ) -> tuple[TokenSplit | None, Scope | None]:
    """For ``tokens = "output_dense"``: the split of the top-level graph and its scope, or
    (None, None) with the reason in ``skipped`` (every token then runs sparse)."""
    if plan.tokens != "output_dense" or not plan.groups:
        return None, None
    found, why = find_output_tokens(gm)
    if found is None:
        skipped.append(Skipped("tokens", f"output_dense: every token runs sparse: {why}"))
        return None, None
    top = next((u.scope for gp in plan.groups for u in gp.group.units if u.scope.gm is gm), None)
    if top is None:
        skipped.append(Skipped("tokens", "output_dense: every token runs sparse: the groups live in "
                               "sub-graphs (activation checkpointing), not next to the loss"))
        return None, None
    valid = masks.get(id(top))
    split = insert_token_split(gm.graph, found, valid, Budget.from_policy(plan.dense_tokens))
    log.info("sparselora: output tokens from the %s, dense budget %s", found.origin, plan.dense_tokens)
    return split, top


def rewrite_graph(gm: GraphModule, plan: Plan, example_inputs: list[Any], skipped: list[Skipped]) -> int:
    """Rewrite every planned group; return how many were rewritten."""
    masks = _scope_mask(plan)
    real = real_weights(gm, example_inputs)
    split, top = _token_split(gm, plan, masks, skipped)
    split_scope = id(top) if top is not None else None
    touched: dict[int, Scope] = {split_scope: top} if top is not None else {}
    if drop_markers(gm) and top is None:
        touched[-1] = Scope(gm)
    done = 0
    in_subgraph = 0
    fused = FusedRewrites()
    factors = GraphFactors(gm, real)
    for gp in list(plan.groups):
        group = gp.group
        scope_id = id(group.units[0].scope)
        if split is not None and scope_id != split_scope:
            in_subgraph += 1
        try:
            _check(gp, real)
            REWRITERS[group.kind](gp, group.mask or masks.get(scope_id), split if scope_id == split_scope else None,
                                  **({"fused": fused} if group.kind.startswith("attn") else {}), factors=factors)
        except CannotRewrite as err:
            warnings.warn(f"sparselora: {group.name} ({group.kind}) stays dense: {err}", stacklevel=3)
            skipped.append(Skipped(group.name, f"{group.kind} not rewritten: {err}"))
            plan.groups.remove(gp)
            continue
        touched[id(group.units[0].scope)] = group.units[0].scope
        done += 1
    fused.finish(skipped)
    factors.finish()
    if factors.bindings and not any(scope.gm is gm for scope in touched.values()):
        touched[id(gm)] = Scope(gm)  # get_attr nodes (and op operands) in the top-level graph
    if in_subgraph:
        skipped.append(Skipped("tokens", f"output_dense: {in_subgraph} group(s) in sub-graphs run every token "
                               "sparse (the token split lives in the top-level graph)"))
    for scope in touched.values():
        scope.gm.graph.lint()
        scope.gm.recompile()
        refresh_meta(scope.gm)
    return done


def refresh_meta(gm: GraphModule) -> None:
    """Re-derive every node's ``example_value`` with fake tensors (new nodes and narrowed ones)."""
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    args = [n.meta.get("example_value") for n in placeholders]
    # The placeholders' own fake mode (the tracing context may hold another one).
    mode = next((a.fake_mode for a in args if hasattr(a, "fake_mode")), None)
    if mode is None:
        log.debug("refresh_meta: no fake mode on the placeholders; meta left as is")
        return
    class _Prop(FakeTensorProp):
        def get_attr(self, target, args, kwargs):  # real buffers (estimator factors) as fakes
            value = super().get_attr(target, args, kwargs)
            if isinstance(value, torch.Tensor) and not hasattr(value, "fake_mode"):
                return mode.from_tensor(value, static_shapes=True)
            return value

    with mode:
        _Prop(gm, mode=mode).propagate_dont_convert_inputs(*args)
    for node in gm.graph.nodes:
        if "val" in node.meta:
            node.meta["example_value"] = node.meta["val"]
