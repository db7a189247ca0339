"""Output tokens at run time: the user's marker op, the split op and its device-side counters.

The compile-time half (finding which tokens' logits enter the loss, inserting the split into the
graph) is ``passes/tokens.py``; what runs inside a compiled step lives here. ``split_tokens``
orders tokens by priority (output, then context, then padding; stable), the first ``D``
(``Budget``) run dense and the rest sparse; output tokens beyond ``D`` run sparse and are counted
on the device (``token_stats()``), with no host sync inside the step.
"""

from __future__ import annotations

import threading
from fractions import Fraction
from typing import Any, NamedTuple

import torch

# ------------------------------------------------------------------------------ the user's marker


@torch.library.custom_op("sparselora::output_tokens", mutates_args=("mask",))
def _output_tokens(mask: torch.Tensor) -> None:
    """No-op at run time; declared mutating so Dynamo keeps it in the graph for the pass to read."""


def mark_output_tokens(mask: torch.Tensor) -> None:
    """Tell ``tokens = "output_dense"`` which tokens are output tokens, explicitly.

    Why: a loss computed outside the compiled code (or not a ``cross_entropy``) leaves the pass
    nothing to read. Call this inside the compiled function on a ``[batch, seq]`` tensor
    (nonzero = output token, the same layout as ``input_ids``); the pass removes the call and uses
    the mask. It has no effect with other backends or with ``tokens = "all_sparse"``.
    """
    _output_tokens(mask)



# ------------------------------------------------------------------------------ the split op


class Budget(NamedTuple):
    """``D`` per micro-batch of ``N`` tokens: ``min(fixed, N)`` if ``fixed`` else ``N * num // den``."""

    num: int
    den: int
    fixed: int

    @classmethod
    def from_policy(cls, dense_tokens: float | int) -> "Budget":
        if isinstance(dense_tokens, int) and not isinstance(dense_tokens, bool):
            return cls(0, 1, int(dense_tokens))
        frac = Fraction(str(float(dense_tokens)))  # 0.25 as written: 1/4
        return cls(frac.numerator, frac.denominator, 0)

    def dense(self, n: Any) -> Any:
        """D for ``n`` tokens (an int or a SymInt; integer arithmetic, no guard)."""
        if self.fixed:
            return torch.sym_min(self.fixed, n)
        return n * self.num // self.den


#: Per device: int64 [calls, output tokens, overflow tokens], accumulated on the device.
_STATS: dict[torch.device, torch.Tensor] = {}
_STATS_LOCK = threading.Lock()


class TokenStats(NamedTuple):
    """Totals since the last reset: split calls, output tokens seen, output tokens run sparse."""

    calls: int
    output_tokens: int
    overflow_tokens: int


def _stats(device: torch.device) -> torch.Tensor:
    with _STATS_LOCK:
        if device not in _STATS:
            _STATS[device] = torch.zeros(3, dtype=torch.int64, device=device)
        return _STATS[device]


def token_stats() -> TokenStats:
    """Read the overflow counters (this synchronises the device: call it per log step, not per op).

    Why: overflow (output tokens beyond the dense budget, run sparse) must be visible without a
    host sync inside the step; the step adds to a device tensor and this reads it.
    """
    total = [0, 0, 0]
    with _STATS_LOCK:
        for t in _STATS.values():
            total = [a + int(b) for a, b in zip(total, t.tolist())]
    return TokenStats(*total)


def reset_token_stats() -> None:
    """Zero the counters ``token_stats`` reads."""
    with _STATS_LOCK:
        for t in _STATS.values():
            t.zero_()


def _split_sizes(n: Any, num: int, den: int, fixed: int) -> tuple[Any, Any]:
    d = Budget(num, den, fixed).dense(n)
    return d, n - d


# Tagged nondeterministic_seeded so the min-cut partitioner saves its outputs instead of running
# it again in backward (which would count the overflow twice).
@torch.library.custom_op("sparselora::split_tokens", mutates_args=(),
                         tags=(torch.Tag.nondeterministic_seeded,))
def split_tokens(out_mask: torch.Tensor, valid: torch.Tensor | None, num: int, den: int,
                 fixed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(dense_idx [D], sparse_idx [N - D]): flat token indices, each sorted ascending.

    Priority output (valid and marked), then context (valid), then padding; ties keep token order.
    """
    out = out_mask.reshape(-1) != 0
    n = out.shape[0]
    ok = valid.reshape(-1) != 0 if valid is not None else torch.ones_like(out)
    key = torch.where(ok, torch.where(out, 0, 1), 2).to(torch.int8)
    order = torch.argsort(key, stable=True)
    d, _ = _split_sizes(n, num, den, fixed)
    n_out = (out & ok).sum()
    overflow = (n_out - d).clamp(min=0)
    _stats(out.device).add_(torch.stack([torch.ones_like(n_out), n_out, overflow]))
    return torch.sort(order[:d]).values, torch.sort(order[d:]).values


@split_tokens.register_fake
def _(out_mask, valid, num, den, fixed):
    n = out_mask.numel()
    d, rest = _split_sizes(n, num, den, fixed)
    return out_mask.new_empty((d,), dtype=torch.int64), out_mask.new_empty((rest,), dtype=torch.int64)



# ------------------------------------------------------------------------------ row helpers (called from rewritten graphs)


def take_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` of ``x`` flattened to ``[tokens, features]`` (called from rewritten graphs)."""
    return x.flatten(0, -2).index_select(0, idx) if x.dim() > 2 else x.index_select(0, idx)


def merge_rows(like: torch.Tensor, dense_idx: torch.Tensor, y_dense: torch.Tensor,
               sparse_idx: torch.Tensor, y_sparse: torch.Tensor) -> torch.Tensor:
    """The dense and sparse rows written back by index, shaped ``[*like.shape[:-1], width]``."""
    width = y_dense.shape[-1]
    out = y_dense.new_zeros((dense_idx.shape[0] + sparse_idx.shape[0], width))
    out = out.index_copy(0, dense_idx, y_dense).index_copy(0, sparse_idx, y_sparse)
    return out.view(*like.shape[:-1], width)

