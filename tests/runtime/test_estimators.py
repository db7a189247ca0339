"""Estimators (svd, token_sample), their registry, and the SVD factor cache.

References are float64 eager computations of the true linear outputs / best low-rank factors.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch
import torch._dynamo.testing

from sparselora_fx.errors import OptionsError, SparseLoRAError
from sparselora_fx.runtime import estimators as E
from sparselora_fx.runtime import factor_cache as fc


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test gets an empty in-memory cache and its own disk cache directory."""
    monkeypatch.setenv("SPARSELORA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SPARSELORA_DISK_CACHE", "1")
    fc.clear_cache()
    E._FALLBACK_WARNED.clear()
    yield
    fc.clear_cache()
    E._FALLBACK_WARNED.clear()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _linear(out_f: int, in_f: int, seed: int, dtype=torch.float32):
    g = _gen(seed)
    w = torch.randn(out_f, in_f, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(out_f, generator=g, dtype=torch.float64).to(dtype)
    return w, b


def _oracle_top(x2d, w, b, mask, keep):
    """Float64 truth: top-`keep` channels by L2 norm over real tokens of x W^T + b."""
    y = x2d.double() @ w.double().t() + b.double()
    if mask is not None:
        y = y * (mask != 0).double()[:, None]
    return set(torch.topk(y.norm(dim=0), keep).indices.tolist())


def _top(y, keep):
    return set(torch.topk(y.double().norm(dim=0), keep).indices.tolist())


def _low_rank_weight(out_f, in_f, seed, decay=0.7):
    """A weight with a decaying spectrum, so a rank-k approximation is well defined."""
    g = _gen(seed)
    u, _ = torch.linalg.qr(torch.randn(out_f, min(out_f, in_f), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(in_f, min(out_f, in_f), generator=g, dtype=torch.float64))
    s = decay ** torch.arange(min(out_f, in_f), dtype=torch.float64)
    return ((u * s) @ v.t()).float()


def _best_rank_k_error(w, k):
    s = torch.linalg.svdvals(w.double())
    return s[k:].square().sum().sqrt().item()


# ---------------------------------------------------------------------------------------------
# Estimator exactness against the float64 oracle


def test_full_rank_svd_reproduces_oracle_ranking():
    w, b = _linear(24, 16, seed=1)
    x = torch.randn(30, 16, generator=_gen(2))
    mask = torch.ones(30)
    mask[20:] = 0
    x[20:] *= 50.0  # padding would dominate the ranking if it leaked in
    est = E.get_estimator("svd", rank=16)
    y = est.estimate(x, w, b, mask)
    ref = (x.double() @ w.double().t() + b.double()) * mask.double()[:, None]
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)
    assert _top(y, 6) == _oracle_top(x, w, b, mask, 6)
    assert _oracle_top(x, w, b, mask, 6) != _oracle_top(x, w, b, None, 6)  # the mask matters
    assert torch.all(y[20:] == 0)


def test_token_sample_all_tokens_reproduces_oracle_ranking():
    w, b = _linear(24, 16, seed=3)
    x = torch.randn(30, 16, generator=_gen(4))
    mask = torch.ones(30)
    mask[::3] = 0
    x[::3] *= 50.0
    y = E.get_estimator("token_sample", samples=30, seed=5).estimate(x, w, b, mask)
    assert y.shape == (30, 24)
    assert _top(y, 6) == _oracle_top(x, w, b, mask, 6)
    assert _oracle_top(x, w, b, mask, 6) != _oracle_top(x, w, b, None, 6)
    # exact norms: every real token was picked once, padding rows are zero
    ref = (x.double() @ w.double().t() + b.double()) * mask.double()[:, None]
    torch.testing.assert_close(y.double().norm(dim=0), ref.norm(dim=0), rtol=1e-5, atol=1e-5)


def test_low_rank_svd_estimate_is_the_best_rank_k_approximation():
    w = _low_rank_weight(20, 12, seed=6)
    x = torch.randn(7, 12, generator=_gen(7))
    y = E.SvdEstimator(rank=3).estimate(x, w, None)
    u, s, vh = torch.linalg.svd(w.double().t(), full_matrices=False)
    ref = x.double() @ (u[:, :3] * s[:3]) @ vh[:3]
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# token_sample: determinism, padding, dynamic shapes


def test_token_sample_is_deterministic_and_depends_on_seed():
    mask = torch.ones(200)
    a, va = E.sample_tokens(200, 16, 1, mask, torch.device("cpu"))
    b, vb = E.sample_tokens(200, 16, 1, mask, torch.device("cpu"))
    c, _ = E.sample_tokens(200, 16, 2, mask, torch.device("cpu"))
    assert torch.equal(a, b) and torch.equal(va, vb)
    assert set(a.tolist()) != set(c.tolist())
    assert len(set(a.tolist())) == 16  # no repeats


def test_token_sample_excludes_padding():
    mask = torch.zeros(100)
    mask[torch.arange(0, 100, 4)] = 1  # 25 real tokens
    picks, valid = E.sample_tokens(100, 10, 0, mask, torch.device("cpu"))
    assert picks.shape == (10,) and bool(valid.all())
    assert all(mask[i] == 1 for i in picks.tolist())
    # fewer real tokens than samples: all real ones picked, padded picks marked invalid
    picks, valid = E.sample_tokens(100, 40, 0, mask, torch.device("cpu"))
    real = {i for i in picks[valid].tolist()}
    assert real == set(torch.arange(0, 100, 4).tolist())
    assert int(valid.sum()) == 25
    w, b = _linear(8, 6, seed=8)
    x = torch.randn(100, 6, generator=_gen(9))
    y = E.TokenSampleEstimator(samples=40, seed=0).estimate(x, w, b, mask)
    assert torch.all(y[~valid] == 0)


def test_token_sample_clamps_to_token_count():
    w, b = _linear(8, 6, seed=10)
    x = torch.randn(5, 6, generator=_gen(11))
    y = E.TokenSampleEstimator(samples=64).estimate(x, w, b)
    assert y.shape == (5, 8)


@pytest.mark.parametrize("fraction", [0.0, 0.25])
def test_token_sample_no_recompiles_over_token_counts(fraction):
    # sizes chosen distinct from every token count (duck sizing would tie equal sizes together)
    w, b = _linear(13, 5, seed=12)
    est = E.TokenSampleEstimator(samples=16 if not fraction else 4, seed=3, fraction=fraction)

    def fn(x, mask):
        return est.estimate(x, w, b, mask).norm(dim=0)

    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, backend=counter, dynamic=True)
    for t in (6, 11, 23, 40):  # below and above the sample count
        x = torch.randn(t, 5, generator=_gen(t))
        mask = (torch.arange(t) % 5 != 0).float()
        torch.testing.assert_close(compiled(x, mask), fn(x, mask))
    assert counter.frame_count == 1


# ---------------------------------------------------------------------------------------------
# Registry and fallback


def test_registry_unknown_kind_lists_kinds():
    with pytest.raises(OptionsError, match="svd.*token_sample"):
        E.get_estimator("magic")
    assert issubclass(OptionsError, SparseLoRAError)


@pytest.mark.parametrize(
    "params, match",
    [({"rnak": 8}, "unknown parameter"), ({"rank": 0}, ">= 1"), ({"samples": 2.5}, "must be an int")],
)
def test_registry_rejects_bad_params(params, match):
    with pytest.raises(OptionsError, match=match):
        E.get_estimator("svd", **params)


def test_registry_ignores_knobs_of_other_kinds():
    est = E.get_estimator("token_sample", rank=4, samples=9, seed=2)
    assert est == E.TokenSampleEstimator(samples=9, seed=2)
    assert E.get_estimator("svd", rank=4, samples=9, seed=2) == E.SvdEstimator(4, 9, 2)


def test_svd_falls_back_to_token_sample_with_one_warning(monkeypatch):
    w, b = _linear(10, 6, seed=13)
    x = torch.randn(9, 6, generator=_gen(14))
    monkeypatch.setattr(fc, "get_factors", lambda weight, rank: None)
    est = E.SvdEstimator(rank=4, samples=5, seed=1)
    with pytest.warns(RuntimeWarning, match=r"\(10, 6\)"):
        y = est.estimate(x, w, b)
    expected = E.TokenSampleEstimator(samples=5, seed=1).estimate(x, w, b)
    torch.testing.assert_close(y, expected)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        est.estimate(x, w, b)  # second time: silent


# ---------------------------------------------------------------------------------------------
# Factors: values and the private RNG


def test_factors_match_float64_truncated_svd():
    w = _low_rank_weight(16, 12, seed=15)
    p, q = fc.get_factors(w, 4)
    assert p.shape == (12, 4) and q.shape == (4, 16) and p.dtype == w.dtype
    u, s, vh = torch.linalg.svd(w.double().t(), full_matrices=False)
    torch.testing.assert_close((p @ q).double(), (u[:, :4] * s[:4]) @ vh[:4], rtol=1e-4, atol=1e-5)


def test_factors_stored_in_model_dtype():
    w = _low_rank_weight(16, 12, seed=16).to(torch.bfloat16)
    p, q = fc.get_factors(w, 4)
    assert p.dtype == q.dtype == torch.bfloat16


def test_randomized_svd_leaves_global_rng_unchanged(monkeypatch):
    w = _low_rank_weight(300, 260, seed=17)  # > SMALL_WEIGHT_NUMEL and rank << min(shape)
    calls = []
    real = torch.svd_lowrank
    monkeypatch.setattr(torch, "svd_lowrank", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(1234)
    expected = torch.rand(8)
    torch.manual_seed(1234)
    p1, q1 = fc.compute_factors(w, 8)
    after = torch.rand(8)
    assert calls, "the randomized path was not taken"
    assert torch.equal(after, expected)
    torch.manual_seed(999)  # different global state: factors must not depend on it
    p2, q2 = fc.compute_factors(w, 8)
    assert torch.equal(p1, p2) and torch.equal(q1, q2)
    err = torch.linalg.matrix_norm(w.double().t() - (p1 @ q1).double()).item()
    assert err <= 1.01 * _best_rank_k_error(w, 8) + 1e-6


# ---------------------------------------------------------------------------------------------
# Factor cache


def _files(path):
    return sorted(os.listdir(path)) if path.exists() else []


def _cache_path():
    return fc.cache_dir()


def test_memory_hit_and_stats():
    w = _low_rank_weight(16, 12, seed=18)
    a = fc.get_factors(w, 4)
    b = fc.get_factors(w, 4)
    assert a[0] is b[0] and a[1] is b[1]
    stats = fc.cache_stats()
    assert (stats.hits, stats.misses, stats.entries) == (1, 1, 1)
    assert stats.bytes_in_memory == (12 * 4 + 4 * 16) * 4
    assert stats.build_seconds > 0


def test_value_keyed_cache_survives_new_storage():
    """FSDP2 regathers (new storage, same values): still a hit; data_ptr is not the key."""
    w = _low_rank_weight(16, 12, seed=19)
    a = fc.get_factors(w, 4)
    b = fc.get_factors(w.clone(), 4)
    assert a[0] is b[0]
    assert fc.cache_stats().hits == 1


def test_fingerprint_memoised_per_version(monkeypatch):
    w = _low_rank_weight(16, 12, seed=20)
    calls = []
    real = fc._compute_fingerprint
    monkeypatch.setattr(fc, "_compute_fingerprint", lambda t: calls.append(1) or real(t))
    fc.get_factors(w, 4)
    fc.get_factors(w, 4)
    fc.get_factors(w, 2)
    assert len(calls) == 1
    with torch.no_grad():
        w.add_(1.0)
    fc.get_factors(w, 4)
    assert len(calls) == 2


def test_fingerprint_memo_covers_fresh_views_and_dies_with_the_weight(monkeypatch):
    """The rewrite passes `W.t()` (a new view object each step): still one host hash."""
    import gc

    w = _low_rank_weight(200, 100, seed=35)  # larger than FINGERPRINT_SAMPLES: sampled path
    calls = []
    real = fc._compute_fingerprint
    monkeypatch.setattr(fc, "_compute_fingerprint", lambda t: calls.append(1) or real(t))
    fps = {fc.fingerprint(w.t()) for _ in range(3)}
    assert len(calls) == 1 and len(fps) == 1
    # same values and shape, contiguous or not: one fingerprint (one cache entry, one file)
    assert fps == {real(w.t().contiguous())}
    assert fc.fingerprint(w) != fps.pop()  # the other orientation is another weight
    p, q = fc.get_factors(w.t(), 4)
    assert p.shape == (200, 4) and q.shape == (4, 100)
    with torch.no_grad():
        w[0, 0] += 1.0  # changes a sampled value; the view shares the version counter
    fc.fingerprint(w.t())
    assert len(calls) == 3
    del w
    gc.collect()
    assert fc._STATE.memo == {}


def test_changed_weight_gets_new_factors():
    w = _low_rank_weight(16, 12, seed=21)
    p1, q1 = fc.get_factors(w, 4)
    with torch.no_grad():
        w.copy_(_low_rank_weight(16, 12, seed=22))
    p2, q2 = fc.get_factors(w, 4)
    expected = fc.compute_factors(w, 4)
    assert not torch.equal(p1 @ q1, p2 @ q2)
    torch.testing.assert_close(p2 @ q2, expected[0] @ expected[1])


def test_disk_round_trip(monkeypatch):
    w = _low_rank_weight(16, 12, seed=23)
    p, q = fc.get_factors(w, 4)
    files = _files(_cache_path())
    assert files == [f"{fc.fingerprint(w)}-r4.safetensors"]
    fc.clear_cache()
    monkeypatch.setattr(fc, "compute_factors", lambda *a: pytest.fail("rebuilt despite disk cache"))
    p2, q2 = fc.get_factors(w, 4)
    assert torch.equal(p, p2) and torch.equal(q, q2)
    assert fc.cache_stats().disk_hits == 1


def test_disk_cache_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("SPARSELORA_DISK_CACHE", "0")
    assert fc.get_factors(_low_rank_weight(16, 12, seed=24), 4) is not None
    assert _files(_cache_path()) == []


def _write_then_forget(w, rank=4):
    fc.get_factors(w, rank)
    fc.clear_cache()
    return _cache_path() / f"{fc.fingerprint(w)}-r{rank}.safetensors"


def _assert_rebuilt(w, caplog, rank=4):
    with caplog.at_level(logging.WARNING, logger="sparselora_fx"):
        p, q = fc.get_factors(w, rank)
    assert "ignoring factor cache file" in caplog.text
    stats = fc.cache_stats()
    assert stats.rejected_files == 1 and stats.disk_hits == 0
    ref = fc.compute_factors(w, rank)
    torch.testing.assert_close(p @ q, ref[0] @ ref[1])
    # the rebuilt file is valid again
    fc.clear_cache()
    fc.get_factors(w, rank)
    assert fc.cache_stats().disk_hits == 1


def test_truncated_file_is_rebuilt(caplog):
    w = _low_rank_weight(16, 12, seed=25)
    path = _write_then_forget(w)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _assert_rebuilt(w, caplog)


def test_foreign_file_is_rebuilt(caplog):
    from safetensors.torch import save_file

    w = _low_rank_weight(16, 12, seed=26)
    path = _write_then_forget(w)
    save_file({"P": torch.zeros(12, 4), "Q": torch.zeros(4, 16)}, str(path))  # no metadata
    _assert_rebuilt(w, caplog)


def test_mismatching_file_is_rebuilt(caplog):
    from safetensors.torch import save_file

    w = _low_rank_weight(16, 12, seed=27)
    path = _write_then_forget(w)
    meta = fc._metadata(w, fc.fingerprint(w), 4)
    save_file({"P": torch.zeros(12, 3), "Q": torch.zeros(3, 16)}, str(path), metadata=meta)
    _assert_rebuilt(w, caplog)


def test_garbage_file_is_rebuilt(caplog):
    w = _low_rank_weight(16, 12, seed=28)
    path = _write_then_forget(w)
    path.write_bytes(b"not a safetensors file at all")
    _assert_rebuilt(w, caplog)


def test_atomic_write_leaves_no_temp_files(monkeypatch):
    import safetensors.torch

    for seed in (29, 30):
        fc.get_factors(_low_rank_weight(16, 12, seed=seed), 4)
    assert all(f.endswith(".safetensors") and not f.startswith(".") for f in _files(_cache_path()))
    assert len(_files(_cache_path())) == 2

    def failing_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    w = _low_rank_weight(16, 12, seed=31)
    assert fc.get_factors(w, 4) is not None  # a failed write never stops training
    assert len(_files(_cache_path())) == 2  # neither a final nor a temporary file


def test_nan_weight_returns_none_and_warns_once():
    w = _low_rank_weight(16, 12, seed=32)
    w[3, 4] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"\(16, 12\)"):
        assert fc.get_factors(w, 4) is None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fc.get_factors(w, 4) is None
    assert fc.cache_stats().unusable == 1
    assert _files(_cache_path()) == []


def test_meta_weight_returns_none_silently():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fc.get_factors(torch.empty(16, 12, device="meta"), 4) is None
    assert fc.cache_stats().misses == 0


def test_prepare_factors_reports_usable():
    good = _low_rank_weight(16, 12, seed=33)
    bad = _low_rank_weight(16, 12, seed=34)
    bad[0, 0] = float("inf")
    with pytest.warns(RuntimeWarning):
        result = fc.prepare_factors([("a.weight", good), ("b.weight", bad)], 4, progress=False)
    assert result == {"a.weight": True, "b.weight": False}
    assert fc.get_factors(good, 4) is not None and fc.cache_stats().hits == 1


def test_get_factors_rejects_non_matrix():
    with pytest.raises(SparseLoRAError, match="2-D"):
        fc.get_factors(torch.zeros(3), 4)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("kind", ["svd", "token_sample"])
def test_column_norms_equal_the_norms_of_the_estimate(kind: str, with_bias: bool) -> None:
    """V/O and Q/K scores use column_norms (a Gram matrix for SVD): the same numbers as the estimate's norms."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(37, 12, generator=g, dtype=torch.float64)
    w = torch.randn(9, 12, generator=g, dtype=torch.float64)
    b = torch.randn(9, generator=g, dtype=torch.float64) if with_bias else None
    mask = (torch.arange(37) % 4 != 0).to(torch.float64)
    est = E.get_estimator(kind, rank=3, samples=11, seed=1)
    (got,) = est.column_norms(x, [(w, b)], mask)
    want = est.estimate(x, w, b, mask).norm(dim=0)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_column_norms_of_several_linears_share_one_projection() -> None:
    """Q and K are scored together (one x @ [P_q | P_k] GEMM): each equals its own estimate's norms."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(29, 12, generator=g, dtype=torch.float64)
    wq, wk = torch.randn(10, 12, generator=g, dtype=torch.float64), torch.randn(6, 12, generator=g, dtype=torch.float64)
    bk = torch.randn(6, generator=g, dtype=torch.float64)
    mask = (torch.arange(29) % 3 != 0).to(torch.float64)
    est = E.get_estimator("svd", rank=3)
    got = est.column_norms(x, [(wq, None), (wk, bk)], mask)
    for (w, b), norms in zip([(wq, None), (wk, bk)], got):
        torch.testing.assert_close(norms, est.estimate(x, w, b, mask).norm(dim=0), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("tokens, want", [(10, 4), (100, 4), (1000, 30), (1033, 30), (1034, 31), (4096, 122)])
def test_token_sample_fraction_scales_with_the_batch(tokens: int, want: int) -> None:
    """m = max(samples, floor(fraction * T)), clamped to T: 3% of 1033 is 30.99 -> 30, of 1034 31.02."""
    est = E.get_estimator("token_sample", samples=4, fraction=0.03)
    assert est.sample_count(tokens) == want
    w, b = _linear(7, 5, seed=20)
    x = torch.randn(tokens, 5, generator=_gen(21))
    assert est.estimate(x, w, b).shape == (min(want, tokens), 7)


def test_token_sample_fraction_one_is_the_oracle() -> None:
    w, b = _linear(11, 6, seed=22)
    x = torch.randn(40, 6, generator=_gen(23))
    mask = (torch.arange(40) % 7 != 0).float()
    y = E.get_estimator("token_sample", samples=1, fraction=1.0).estimate(x, w, b, mask)
    assert _top(y, 5) == _oracle_top(x, w, b, mask, 5)


def test_token_sample_fraction_bad_values_are_errors() -> None:
    with pytest.raises(OptionsError, match=r"fraction=1.5 must be a number in \[0, 1\]"):
        E.get_estimator("token_sample", fraction=1.5)
    with pytest.raises(OptionsError, match=r"unknown parameter\(s\) \['_ratio'\]"):
        E.get_estimator("token_sample", _ratio=1)


def test_random_estimator_draws_fresh_scores_each_call_and_repeats_after_reset() -> None:
    w, b = _linear(50, 6, seed=24)
    x = torch.randn(9, 6, generator=_gen(25))
    est = E.get_estimator("random", seed=7)
    E.reset_random_estimators()
    first = [_top(est.estimate(x, w, b), 10) for _ in range(3)]
    assert len({frozenset(t) for t in first}) == 3  # a fresh draw every call
    E.reset_random_estimators()
    assert [_top(est.estimate(x, w, b), 10) for _ in range(3)] == first
    (norms,) = est.column_norms(x, [(w, b)])
    assert norms.shape == (50,) and bool(((norms >= 0) & (norms < 1)).all())
