"""The one counter surface (``sparselora_fx.counters``): bumped where things happen, and the recorder."""

from __future__ import annotations

import collections

import pytest
import torch

from sparselora_fx import backend
from sparselora_fx import factor_cache as fc
from sparselora_fx.counters import counters, lowered, record_selections
from sparselora_fx.models import build_tiny_model, tiny_batch
from sparselora_fx.runtime import selection

OPTIONS = {"inner": "aot_eager", "sparsity": 0.5, "progress": False}


def _select_mlp(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, keep: int = 3) -> torch.Tensor:
    return torch.ops.sparselora.select_mlp(x, w1, None, w2, None, None, keep, "silu", "token_sample", 8, 4, 0, 0.0)


def _select_vo(x: torch.Tensor, w_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.sparselora.select_vo(x, w_v, None, None, 2, 2, 1, 4, "token_sample", 8, 4, 0, 0.0)


def _step(fn, batch) -> None:
    fn(**batch).loss.backward()


def test_a_compile_bumps_the_pass_counters_as_the_report_says(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARSELORA_DISK_CACHE", "0")
    fc.clear_cache()
    counters.clear()
    backend.LAST_REPORTS.clear()
    model = build_tiny_model("llama", num_layers=1)
    batch = tiny_batch("llama")
    fn = torch.compile(model, backend="sparselora", options=OPTIONS)
    with record_selections() as rec:
        _step(fn, batch)

    (report,) = backend.LAST_REPORTS
    c = counters["sparselora"]
    counts = report.counts()
    assert c["units_matched"] == counts["units"] == 7  # q, k, v, o, gate, up, down
    for kind in ("gated_mlp", "mlp", "attn_qk", "attn_vo"):
        assert c[f"group_{kind}"] == counts.get(kind, 0), kind
    assert c["groups_rewritten"] == counts["groups"] == 3
    grouped = {u.fqn for g in report.groups for u in g.units}
    assert c["units_skipped"] == counts["units"] - len(grouped) == 0
    # each SVD-estimated group's read weights (gate/up; q/k; v) get factors at compile time, all built
    svd = [g for g in report.groups if g.estimator.startswith("svd")]
    assert svd, [g.estimator for g in report.groups]
    estimated = sum(1 for g in svd for u in g.units if u.role not in ("down", "fc2", "o"))
    assert c["factors_prepared"] == estimated
    assert c["factor_cache_misses"] == c["factor_cache_builds"] == fc.cache_stats().misses == estimated
    assert c["fingerprints_computed"] >= estimated
    assert not [k for k in c if k.startswith("lowered_")]  # CPU: no Triton swap

    # The recorder saw one call of each group's select op, with its kept indices.
    assert sorted(name for name, _ in rec.picks) == ["select_mlp", "select_qk", "select_vo"]
    (kept,) = rec.of("select_mlp")
    intermediate = model.base_model.model.model.layers[0].mlp.gate_proj.base_layer.out_features
    assert kept.numel() == selection.keep_count(intermediate, 0.5)
    assert torch.equal(kept, kept.sort().values)

    rewritten = c["groups_rewritten"]
    _step(fn, batch)  # no recompile, and outside the block: nothing counted, nothing recorded
    assert c["groups_rewritten"] == rewritten and len(backend.LAST_REPORTS) == 1
    assert len(rec.picks) == 3


def test_clear_empties_the_namespace_in_place_so_the_old_names_stay_live() -> None:
    from sparselora_fx.passes import COUNTERS
    from sparselora_fx.passes.lower import LOWERED

    assert COUNTERS is counters["sparselora"]
    counters.clear()
    assert COUNTERS is counters["sparselora"] and not COUNTERS
    try:
        counters["sparselora"]["lowered_rows_linear"] += 2
        counters["sparselora"]["units_matched"] += 1
        assert COUNTERS["units_matched"] == 1
        assert LOWERED["rows_linear"] == 2 and "rows_linear" in LOWERED
        assert LOWERED["cols_linear"] == 0 and "cols_linear" not in LOWERED  # reads like a Counter
        assert dict(LOWERED) == dict(lowered()) == {"rows_linear": 2}
        before = LOWERED.copy()
        assert isinstance(before, collections.Counter)
        counters["sparselora"]["lowered_rows_linear"] += 1
        counters["sparselora"]["lowered_cols_linear"] += 1
        assert LOWERED - before == collections.Counter(rows_linear=1, cols_linear=1)
        assert sum(LOWERED.values()) == 4 and len(LOWERED) == 2
    finally:
        counters.clear()
    assert not LOWERED


def test_the_factor_cache_counts_its_events(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARSELORA_DISK_CACHE", "0")
    fc.clear_cache()
    counters.clear()
    w = torch.randn(24, 16, generator=torch.Generator().manual_seed(0))
    fc.get_factors(w, 4)
    fc.get_factors(w, 4)
    fc.get_factors(w.clone(), 4)  # same values: a hit, after hashing the new tensor once
    c = counters["sparselora"]
    stats = fc.cache_stats()
    assert (c["factor_cache_hits"], c["factor_cache_misses"], c["factor_cache_builds"]) == (2, 1, 1)
    assert (stats.hits, stats.misses) == (2, 1)
    assert c["fingerprints_computed"] == 2
    assert c["factor_cache_disk_hits"] == c["factor_cache_disk_writes"] == 0
    fc.clear_cache()  # resets cache_stats, not the counters
    assert fc.cache_stats().hits == 0 and c["factor_cache_hits"] == 2


def test_record_selections_records_each_call_inside_the_block_only() -> None:
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
    w1, w2, wv = torch.randn(12, 8, generator=g), torch.randn(12, 8, generator=g), torch.randn(4, 8, generator=g)
    _select_mlp(x1, w1, w2)  # before: recorded nowhere
    with record_selections() as rec:
        a = _select_mlp(x1, w1, w2)
        with record_selections(times=True) as inner:
            b = _select_mlp(x2, w1, w2, keep=5)
        vo = _select_vo(x1, wv)
    _select_mlp(x2, w1, w2)  # after: recorded nowhere

    assert [name for name, _ in rec.picks] == ["select_mlp", "select_mlp", "select_vo"]
    got_a, got_b = rec.of("select_mlp")
    assert torch.equal(got_a, a) and torch.equal(got_b, b) and got_b.numel() == 5
    assert got_a.data_ptr() != a.data_ptr()  # a copy: later in-place use of the output cannot change it
    (got_vo,) = rec.of("select_vo")
    assert isinstance(got_vo, tuple) and all(torch.equal(p, q) for p, q in zip(got_vo, vo))
    assert rec.times == []  # times not asked for
    assert [name for name, _ in inner.picks] == ["select_mlp"] and torch.equal(inner.picks[0][1], b)
    assert [name for name, _ in inner.times] == ["select_mlp"] and 0 < inner.times[0][1] < 60


def test_no_recorder_is_left_open_after_an_error() -> None:
    from sparselora_fx import counters as module

    with pytest.raises(RuntimeError), record_selections():
        assert module._ACTIVE
        raise RuntimeError("boom")
    assert module._ACTIVE == ()
