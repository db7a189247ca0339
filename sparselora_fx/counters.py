"""Event counters and the selection recorder: the one index of what sparselora_fx counts.

Modelled on Inductor's ``torch._dynamo.utils.counters``: a ``defaultdict`` of ``Counter``s, bumped
where each thing happens; a test calls ``counters.clear()``, runs something and asserts on
``counters["sparselora"][name]``. Every integer event count of the package lives in the one
namespace ``counters["sparselora"]``:

=================================  =====================================================  ======================
name                               what one bump means                                    bumped in
=================================  =====================================================  ======================
``units_matched``                  a frozen linear + LoRA unit found in a graph            ``passes``
``group_<kind>``                   a dataflow group proven (``group_gated_mlp``,           ``passes``
                                   ``group_mlp``, ``group_attn_qk``, ``group_attn_vo``)
``units_skipped``                  a unit left in no group (it runs dense)                 ``passes``
``factors_prepared``               SVD factors usable after the compile-time prepare pass  ``passes``
``groups_rewritten``               a group written into the graph as sparse ops            ``passes``
``lowered_<op>``                   a public op swapped for its Triton op while tracing     ``passes.lower``
                                   (a cache hit traces nothing and counts nothing)
``fingerprints_computed``          a weight's value fingerprint hashed on the host         ``factor_cache``
``factor_cache_hits``              factors found in memory                                 ``factor_cache``
``factor_cache_misses``            factors not in memory (then read from disk or built)    ``factor_cache``
``factor_cache_disk_hits``         factors read back from a cache file                     ``factor_cache``
``factor_cache_builds``            an SVD run to build factors                             ``factor_cache``
``factor_cache_unusable``          a weight whose factors are not finite (runs a fallback) ``factor_cache``
``factor_cache_disk_writes``       a cache file written                                    ``factor_cache``
``factor_cache_rejected_files``    a cache file ignored as foreign, stale or corrupt       ``factor_cache``
``factor_lookups``                 a step looked a weight's factors up (its graph was      ``factor_cache``
                                   compiled without the weight's values: a DDP piece)
``factors_bound``                  a weight's factors made graph inputs at compile time    ``bound_factors``
``factor_refills``                 a graph's factors refilled in place after the weight    ``bound_factors``
                                   changed (``load_state_dict``, ``refresh_factors``)
=================================  =====================================================  ======================

``counters.clear()`` empties every namespace in place (the ``Counter`` objects stay), so the old
names stay live views: ``sparselora_fx.passes.COUNTERS`` *is* ``counters["sparselora"]``, and
``sparselora_fx.passes.lower.LOWERED`` reads its ``lowered_<op>`` keys by op name.

What is not an event count stays where it is produced; this is where to read it:

- ``sparselora_fx.factor_cache.cache_stats()``: the factor cache's build seconds, bytes held,
  entries, and its own hit/miss totals since ``clear_cache()`` (which does not touch ``counters``);
- ``sparselora_fx.backend.LAST_REPORTS``: the ``Report`` of each of the latest compiled graphs;
- ``sparselora_fx.runtime.tokens.token_stats()`` (also ``sparselora_fx.passes.tokens``): the
  output-token split counters, accumulated on the device inside the step and read with a sync
  (``reset_token_stats()`` zeroes them);
- ``record_selections()`` below: the channels each selection op kept, and its wall time.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["SelectionRecorder", "counters", "lowered", "record_selections"]

#: The namespace every sparselora_fx event count is bumped in.
NAMESPACE = "sparselora"


class _Counters(collections.defaultdict):
    """``defaultdict(Counter)`` whose ``clear()`` empties each namespace in place (aliases stay live)."""

    def clear(self) -> None:
        for counter in self.values():
            counter.clear()


counters: collections.defaultdict[str, collections.Counter[str]] = _Counters(collections.Counter)
counters[NAMESPACE]  # created up front: `passes.COUNTERS` is this very Counter


class _Prefixed(Mapping):
    """Read-only view of the ``counters["sparselora"]`` keys starting with ``prefix``, named without it.

    Reads like a ``Counter`` (a missing op reads 0; ``copy()`` and ``view - earlier`` give Counters).
    """

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix

    def _items(self) -> dict[str, int]:
        n = len(self._prefix)
        return {k[n:]: v for k, v in counters[NAMESPACE].items() if k.startswith(self._prefix)}

    def __getitem__(self, key: str) -> int:
        return counters[NAMESPACE].get(self._prefix + key, 0)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._prefix + key in counters[NAMESPACE]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items())

    def __len__(self) -> int:
        return len(self._items())

    def copy(self) -> collections.Counter[str]:
        return collections.Counter(self._items())

    def __sub__(self, other: Mapping) -> collections.Counter[str]:
        return self.copy() - collections.Counter(dict(other))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._prefix!r}, {self._items()!r})"


def lowered() -> Mapping[str, int]:
    """The ``lowered_<op>`` counts by op name (what ``passes.lower.LOWERED`` shows)."""
    return _Prefixed("lowered_")


# ------------------------------------------------------------------------------ selection recorder


class SelectionRecorder:
    """What the selection ops run for real (not traced) returned while its ``with`` block was open.

    ``picks``: ``(op_name, kept)`` in call order, ``kept`` the sorted kept-index tensor (a tuple
    of them for ``select_vo``, ``select_qk``), detached copies. ``times``: ``(op_name, seconds)``,
    each op's host wall time (on CUDA its launches, not its kernels).
    """

    def __init__(self, picks: bool, times: bool) -> None:
        self.record_picks = picks
        self.record_times = times
        self.picks: list[tuple[str, Any]] = []
        self.times: list[tuple[str, float]] = []

    def of(self, op: str) -> list[Any]:
        """The kept indices of every call of ``op`` (e.g. ``"select_mlp"``), in call order."""
        return [kept for name, kept in self.picks if name == op]


#: The open recorders, innermost last. Replaced (never mutated) by `record_selections` only, under
#: `_LOCK`, so the per-op check in runtime/selection.py reads one tuple without locking.
_ACTIVE: tuple[SelectionRecorder, ...] = ()
_LOCK = threading.Lock()


@contextlib.contextmanager
def record_selections(*, picks: bool = True, times: bool = False) -> Iterator[SelectionRecorder]:
    """Record every selection op call inside the block: its kept indices and/or its wall time.

    ``picks=False, times=True`` times the ops without copying their outputs (benchmarks). Blocks may
    nest (and overlap across threads); each recorder sees every call made while it is open. With
    none open the ops pay one tuple check.
    """
    global _ACTIVE
    rec = SelectionRecorder(picks, times)
    with _LOCK:
        _ACTIVE = _ACTIVE + (rec,)
    try:
        yield rec
    finally:
        with _LOCK:
            _ACTIVE = tuple(r for r in _ACTIVE if r is not rec)


def _note_selection(op: str, out: Any, started: float) -> None:
    """Called by a selection op (only while some recorder is open) with its output and start clock."""
    elapsed = time.perf_counter() - started
    kept = None
    for rec in _ACTIVE:
        if rec.record_times and started:  # started == 0.0: no recorder was open when the op began
            rec.times.append((op, elapsed))
        if rec.record_picks:
            if kept is None:
                kept = tuple(t.detach().clone() for t in out) if isinstance(out, tuple) else out.detach().clone()
            rec.picks.append((op, kept))
