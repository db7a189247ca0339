"""Output tokens run dense: find which tokens' logits enter the loss, and split each micro-batch.

Compile time; the ops the split inserts, the user's marker and the counters are run time
(``runtime/tokens.py``, re-exported here: ``mark_output_tokens``, ``token_stats``).

SparseLoRA keeps the tokens whose logits enter the loss dense (their outputs are what the loss
reads) and makes only the context tokens sparse (``policy.tokens = "output_dense"``). For a causal
LM the output positions are the ``t`` with ``labels[t + 1] != ignore_index`` (the loss shifts the
labels). Two sources, the first found wins:

- a marker: ``mark_output_tokens(mask)`` called inside the compiled code on a ``[batch, seq]``
  tensor (nonzero = output token);
- the loss: the ``cross_entropy`` call, its ``ignore_index`` and its target traced back through the
  shift / view ops to a graph input (the labels, or HF's ``shift_labels``).

Neither found (BERT classification, a loss computed outside the compiled code): every token runs
sparse, and the report's "not sparsified" table says why.

Per micro-batch nothing is shape- or data-dependent on the host: ``D`` (the dense-token budget,
``policy.dense_tokens``) depends only on the token count; ``split_tokens`` orders tokens by
priority (output, then context, then padding; stable), the first ``D`` run dense and the rest
sparse; output tokens beyond ``D`` (overflow) run sparse and are counted on the device
(``token_stats()``).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx import Graph, GraphModule, Node

from .. import _compat
from ..runtime.tokens import (  # noqa: F401  (re-exported: the documented import path)
    Budget, TokenStats, _output_tokens, mark_output_tokens, merge_rows, reset_token_stats, split_tokens, take_rows,
    token_stats)
from . import graph_ops as ops

CROSS_ENTROPY_FNS = {F.cross_entropy, torch.nn.functional.cross_entropy}
#: Ops a label tensor may pass through between the model input and the loss target.
_LABEL_METHODS = {"view", "reshape", "flatten", "contiguous", "clone", "to", "long", "int"}
_LABEL_FNS = {torch.reshape, torch.flatten, operator.getitem, F.pad, *_compat.PAD_BUILTINS}
#: Ops between the logits and the loss input (flatten, upcast, slice the last position off).
_LOGIT_METHODS = {"view", "reshape", "flatten", "contiguous", "float", "to", "double", "type"}


# ------------------------------------------------------------------------------ finding the mask


@dataclass
class OutputTokens:
    """How to rebuild the ``[batch, seq]`` output-token mask from graph inputs alone."""

    chain: list[Node]  # ops from a placeholder to ``source`` (copied to the top of the graph)
    source: Node  # a [batch, seq'] tensor: labels shifted to logit positions, or the user's mask
    ignore_index: int | None  # None: ``source`` is a mask (nonzero = output token)
    pad: tuple[int, int]  # (left, right) positions the loss never reads (a logits[:, :-1] slice)
    origin: str  # "loss" | "marker"
    marker: Node | None = None  # the mark_output_tokens call, erased once read


class _NotFound(Exception):
    pass


def _chain_to_inputs(node: Any) -> list[Node]:
    """The ops from a graph input to ``node`` (oldest first); each may read only that chain and
    constants, so the chain can be replayed at the top of the graph, before the layers run."""
    chain: list[Node] = []
    cur = node
    while isinstance(cur, Node) and cur.op != "placeholder":
        ok = ops.is_call(cur, _LABEL_FNS, _LABEL_METHODS) and bool(cur.args)
        others = [a for a in cur.all_input_nodes if a is not cur.args[0]] if ok else []
        if not ok or others:
            raise _NotFound(f"the loss target passes through `{cur.name}` ({cur.target}), which the "
                            "token pass does not follow back to the labels")
        chain.append(cur)
        cur = cur.args[0]
    if not isinstance(cur, Node):
        raise _NotFound("the loss target is a constant, not a model input")
    chain.append(cur)
    return chain[::-1]


def _ndim(node: Any) -> int | None:
    val = ops.example_value(node)
    return val.dim() if isinstance(val, torch.Tensor) else None


def _position_slice(node: Node) -> tuple[Node, tuple[int, int]] | None:
    """``logits[:, a:b]`` (or ``[..., a:b, :]``) on a 3-D tensor -> (logits, (a, -b)); else None."""
    if not ops.is_call(node, {operator.getitem}) or _ndim(node.args[0]) != 3:
        return None
    idx = node.args[1]
    idx = idx if isinstance(idx, tuple) else (idx,)
    if idx and idx[0] is Ellipsis:
        idx = (slice(None),) * (3 - (len(idx) - 1)) + tuple(idx[1:])
    idx = tuple(idx) + (slice(None),) * (3 - len(idx))
    if len(idx) != 3 or any(not isinstance(s, slice) for s in idx) or idx[0] != slice(None) \
            or idx[2] != slice(None):
        raise _NotFound(f"the logits are indexed as `{node.name}` {node.args[1]!r}; only a slice of "
                        "positions (logits[:, a:b]) is understood")
    s = idx[1]
    start, stop = s.start or 0, s.stop
    if s.step not in (None, 1) or not isinstance(start, int) or start < 0 \
            or not (stop is None or (isinstance(stop, int) and stop < 0)):
        raise _NotFound(f"the logits slice {s!r} is not logits[:, a:-b] with constant a >= 0, b > 0")
    return node.args[0], (start, 0 if stop is None else -stop)


def _logit_positions(node: Any) -> tuple[int, int]:
    """Walk from the loss input back to the 3-D logits; the positions a slice there cuts off."""
    cur = node
    while isinstance(cur, Node):
        if _ndim(cur) == 3:
            sliced = _position_slice(cur)
            return sliced[1] if sliced is not None else (0, 0)
        if not ops.is_call(cur, methods=_LOGIT_METHODS) or not cur.args:
            break
        cur = cur.args[0]
    raise _NotFound("the loss input does not come from [batch, seq, vocab] logits through "
                    "view / reshape / cast / a position slice")


def _from_loss(gm: GraphModule) -> OutputTokens:
    losses = [n for n in gm.graph.nodes if ops.is_call(n, CROSS_ENTROPY_FNS)]
    if not losses:
        raise _NotFound("the graph has no cross_entropy loss (no labels passed to the model, or the "
                        "loss is computed outside the compiled code); pass labels or call "
                        "sparselora_fx.passes.tokens.mark_output_tokens(mask) in the compiled code")
    if len(losses) > 1:
        raise _NotFound(f"the graph has {len(losses)} cross_entropy calls; mark the output tokens "
                        "with mark_output_tokens(mask)")
    loss = losses[0]
    args = list(loss.args) + [None] * 5
    inp = loss.kwargs.get("input", args[0])
    target = loss.kwargs.get("target", args[1])
    ignore = loss.kwargs.get("ignore_index", args[4] if args[4] is not None else -100)
    if not isinstance(ignore, int):
        raise _NotFound(f"ignore_index {ignore!r} is not a constant int")
    chain = _chain_to_inputs(target)
    two_d = [n for n in chain if _ndim(n) == 2]
    if not two_d or any(_ndim(n) != 1 for n in chain[chain.index(two_d[-1]) + 1:]):
        raise _NotFound("the loss target is not a [batch, seq] label tensor flattened to [tokens]")
    source = two_d[-1]
    return OutputTokens(chain[: chain.index(source) + 1], source, ignore, _logit_positions(inp), "loss")


def _from_marker(gm: GraphModule) -> OutputTokens | None:
    marks = [n for n in gm.graph.nodes if n.op == "call_function"
             and n.target in (torch.ops.sparselora.output_tokens.default, _output_tokens)]
    if not marks:
        return None
    if len(marks) > 1:
        raise _NotFound(f"mark_output_tokens was called {len(marks)} times in one graph; call it once")
    mask = marks[0].args[0]
    if _ndim(mask) != 2:
        raise _NotFound("mark_output_tokens needs a [batch, seq] mask")
    chain = _chain_to_inputs(mask)
    return OutputTokens(chain, mask, None, (0, 0), "marker", marks[0])


def find_output_tokens(gm: GraphModule) -> tuple[OutputTokens | None, str]:
    """The output-token source of ``gm`` (marker first, then the loss), or None and the reason."""
    try:
        found = _from_marker(gm)
        return (found, "") if found is not None else (_from_loss(gm), "")
    except _NotFound as err:
        return None, str(err)


def drop_markers(gm: GraphModule) -> int:
    """Erase ``mark_output_tokens`` calls (they only tell the pass; nothing downstream needs them)."""
    marks = [n for n in gm.graph.nodes if n.op == "call_function"
             and n.target in (torch.ops.sparselora.output_tokens.default, _output_tokens)]
    for n in marks:
        gm.graph.erase_node(n)
    return len(marks)



# ------------------------------------------------------------------------------ inserting the split


@dataclass
class TokenSplit:
    """The split nodes of one graph: every group of that graph reads the same two index sets."""

    dense_idx: Node
    sparse_idx: Node
    shape: tuple[Any, ...]  # [batch, seq] of the output-token mask

    def covers(self, x: Node) -> bool:
        """Whether ``x``'s leading dims are the mask's tokens, in the same order (provably)."""
        val = ops.example_value(x)
        if not isinstance(val, torch.Tensor) or val.dim() < 2:
            return False
        lead = tuple(val.shape[:-1])
        if len(lead) == len(self.shape):
            return all(_known_equal(a, b) for a, b in zip(lead, self.shape))
        return _known_equal(math.prod(lead), math.prod(self.shape))


def _known_equal(a: Any, b: Any) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        from torch.fx.experimental.symbolic_shapes import statically_known_true

        return bool(statically_known_true(a == b))
    except Exception:  # pragma: no cover - an unforeseen SymInt: do not claim equality
        return False


def insert_token_split(graph: Graph, found: OutputTokens, valid: Node | None, budget: Budget) -> TokenSplit:
    """Replay the mask's chain at the top of ``graph`` and add the ``split_tokens`` call there."""
    first = next(n for n in graph.nodes if n.op != "placeholder")
    env: dict[Node, Node] = {}
    with graph.inserting_before(first):
        for n in found.chain:
            env[n] = n if n.op == "placeholder" else graph.node_copy(n, lambda a: env.get(a, a))
        src = env[found.source]
        left, right = found.pad
        if found.ignore_index is None:
            mask = src
            if left or right:
                mask = graph.call_function(F.pad, (src, (left, right)))
        else:
            if left or right:
                src = graph.call_function(F.pad, (src, (left, right)), {"value": found.ignore_index})
            mask = graph.call_function(torch.ne, (src, found.ignore_index))
        split = graph.call_function(torch.ops.sparselora.split_tokens.default,
                                    (mask, valid, budget.num, budget.den, budget.fixed))
        dense_idx = graph.call_function(operator.getitem, (split, 0))
        sparse_idx = graph.call_function(operator.getitem, (split, 1))
    val = ops.example_value(found.source)
    b, t = val.shape
    return TokenSplit(dense_idx, sparse_idx, (b, t + left + right))
