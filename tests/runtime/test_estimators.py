"""Estimators (svd, token_sample, random) and their registry.

References are float64 eager computations of the true linear outputs. The SVD factor cache the
``svd`` estimator reads has its own tests, in ``tests/test_factor_cache.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing

from sparselora_fx.errors import OptionsError, SparseLoRAError
from sparselora_fx.runtime import estimators as E
from sparselora_fx import factor_cache as fc
from tests._weights import low_rank_weight


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
    w = low_rank_weight(20, 12, seed=6)
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
