"""Selection ops: scores against float64 truth, GQA/RoPE maps against brute force, op contracts."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing
import torch.nn.functional as F

from sparselora_fx.counters import record_selections
from sparselora_fx.errors import PolicyError, SparseLoRAError, UnsupportedGraphError
from sparselora_fx.runtime import estimators as E
from sparselora_fx import factor_cache as fc
from sparselora_fx.runtime import selection as S

NH, NKV, HD = 4, 2, 8  # 4 q heads, 2 kv heads (g = 2), head_dim 8
HIDDEN = 12


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSELORA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SPARSELORA_DISK_CACHE", "0")
    fc.clear_cache()
    yield
    fc.clear_cache()


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rand(*shape, seed, scale=1.0):
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64).float() * scale


def _batch(seed, tokens=7, batch=2, in_f=HIDDEN):
    """x [batch, tokens, in] with the last tokens of sequence 1 padded (and made huge, so that
    any leak of padding into a score changes the ranking)."""
    x = _rand(batch, tokens, in_f, seed=seed)
    mask = torch.ones(batch, tokens)
    mask[1, tokens - 3 :] = 0
    x[1, tokens - 3 :] *= 40.0
    return x, mask


# exact estimator configurations: full-rank SVD and a sample covering every token
EXACT = [("svd", {"rank": 64}), ("token_sample", {"samples": 64})]

ACT64 = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "relu": torch.relu,
    "relu2": lambda t: torch.relu(t) ** 2,
    "quick_gelu": lambda t: t * torch.sigmoid(1.702 * t),
}


def _lin64(x, w, b):
    y = x.double().reshape(-1, x.shape[-1]) @ w.double().t()
    return y if b is None else y + b.double()


def _masked(y, mask):
    return y if mask is None else y * mask.reshape(-1, 1).double()


def _top_set(scores, keep):
    return set(torch.topk(scores, keep).indices.tolist())


# ---------------------------------------------------------------------------------------------
# Helpers


def test_keep_count():
    assert S.keep_count(100, 0.0) == 100
    assert S.keep_count(100, 0.9) == 10
    assert S.keep_count(10, 0.99) == 1
    assert S.keep_count(2816, 0.75) == 704
    assert S.keep_count(2816, 0.9) == 281  # 281.6 rounds down
    assert S.keep_count(14336, 0.99) == 143


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_keep_count_rejects_sparsity(bad):
    with pytest.raises(PolicyError, match=repr(bad)):
        S.keep_count(10, bad)
    assert issubclass(PolicyError, SparseLoRAError)


def test_unknown_activation():
    with pytest.raises(UnsupportedGraphError, match="silu"):
        S.activation("swish2")


def test_activations_match_float64_and_map_zero_to_zero():
    t = torch.linspace(-4, 4, 41, dtype=torch.float64)
    for name, ref in ACT64.items():
        torch.testing.assert_close(S.activation(name)(t), ref(t))
        assert S.activation(name)(torch.zeros(1)).item() == 0.0


def test_topk_sorted():
    scores = torch.tensor([0.5, 3.0, 1.0, 2.0, 0.1])
    out = S.topk_sorted(scores, 3)
    assert out.tolist() == [1, 2, 3] and out.dtype == torch.int64


# ---------------------------------------------------------------------------------------------
# MLP


@pytest.mark.parametrize("kind, params", EXACT)
@pytest.mark.parametrize("act", sorted(ACT64))
def test_select_mlp_gated_matches_oracle(kind, params, act):
    x, mask = _batch(seed=1)
    w1, b1 = _rand(24, HIDDEN, seed=2), _rand(24, seed=3)
    w2, b2 = _rand(24, HIDDEN, seed=4), _rand(24, seed=5)
    keep = 7
    idx = S.select_mlp(x, w1, b1, w2, b2, mask, keep, act, kind, samples=params.get("samples", 64),
                       rank=params.get("rank", 8))
    assert idx.dtype == torch.int64 and idx.shape == (keep,)
    assert torch.equal(idx, torch.sort(idx).values)
    truth = ACT64[act](_lin64(x, w1, b1)) * _lin64(x, w2, b2)
    assert set(idx.tolist()) == _top_set(_masked(truth, mask).norm(dim=0), keep)
    assert set(idx.tolist()) != _top_set(truth.norm(dim=0), keep)  # padding excluded


@pytest.mark.parametrize("kind, params", EXACT)
def test_select_mlp_plain_matches_oracle(kind, params):
    x, mask = _batch(seed=6)
    w1, b1 = _rand(20, HIDDEN, seed=7), _rand(20, seed=8)
    idx = S.select_mlp(x, w1, b1, None, None, mask, 5, "gelu", kind, **params)
    truth = F.gelu(_lin64(x, w1, b1))
    assert set(idx.tolist()) == _top_set(_masked(truth, mask).norm(dim=0), 5)


def test_select_mlp_low_rank_and_sampled_run():
    """Non-exact estimators still return valid sorted indices; seeds make sampling repeatable."""
    x, mask = _batch(seed=9, tokens=30)
    w1, w2 = _rand(24, HIDDEN, seed=10), _rand(24, HIDDEN, seed=11)
    a = S.select_mlp(x, w1, None, w2, None, mask, 6, "silu", "token_sample", samples=8, seed=3)
    b = S.select_mlp(x, w1, None, w2, None, mask, 6, "silu", "token_sample", samples=8, seed=3)
    c = S.select_mlp(x, w1, None, w2, None, mask, 6, "silu", "svd", rank=2)
    assert torch.equal(a, b)
    for idx in (a, c):
        assert idx.shape == (6,) and torch.all(idx[1:] > idx[:-1]) and int(idx.max()) < 24


def test_select_mlp_errors():
    x, mask = _batch(seed=12)
    w1 = _rand(24, HIDDEN, seed=13)
    with pytest.raises(UnsupportedGraphError, match="keep=25"):
        S.select_mlp(x, w1, None, None, None, mask, 25, "silu")
    with pytest.raises(UnsupportedGraphError, match="unknown MLP activation"):
        S.select_mlp(x, w1, None, None, None, mask, 4, "tanhh")
    with pytest.raises(UnsupportedGraphError, match="expected"):
        S.select_mlp(x, w1, None, _rand(24, HIDDEN + 1, seed=14), None, mask, 4, "silu")
    with pytest.raises(SparseLoRAError, match="known estimators"):
        S.select_mlp(x, w1, None, None, None, mask, 4, "silu", "oracle")


# ---------------------------------------------------------------------------------------------
# V/O and the GQA map


def _brute_kv_to_q(idx_kv, num_heads, num_kv_heads, head_dim):
    g = num_heads // num_kv_heads
    out = []
    for c in idx_kv:
        j, d = divmod(c, head_dim)
        for h in range(num_heads):
            if h // g == j:  # repeat_kv: q head h reads kv head h // g
                out.append(h * head_dim + d)
    return sorted(out)


@pytest.mark.parametrize("nh, nkv", [(4, 2), (4, 4), (6, 2), (4, 1)])
def test_kv_to_q_channels_brute_force(nh, nkv):
    idx = torch.tensor(sorted({0, 3, min(9, nkv * HD - 2), nkv * HD - 1}))
    got = S.kv_to_q_channels(idx, nh, nkv, HD)
    assert got.tolist() == _brute_kv_to_q(idx.tolist(), nh, nkv, HD)


@pytest.mark.parametrize("kind, params", EXACT)
def test_select_vo_matches_oracle(kind, params):
    x, mask = _batch(seed=15)
    w_v, b_v = _rand(NKV * HD, HIDDEN, seed=16), _rand(NKV * HD, seed=17)
    keep = 5
    idx_v, idx_o = S.select_vo(x, w_v, b_v, mask, keep, NH, NKV, HD, kind, **params)
    truth = _lin64(x, w_v, b_v)
    assert set(idx_v.tolist()) == _top_set(_masked(truth, mask).norm(dim=0), keep)
    assert set(idx_v.tolist()) != _top_set(truth.norm(dim=0), keep)
    assert idx_v.tolist() == sorted(idx_v.tolist())
    assert idx_o.shape == (keep * NH // NKV,)
    assert idx_o.tolist() == _brute_kv_to_q(idx_v.tolist(), NH, NKV, HD)


# ---------------------------------------------------------------------------------------------
# Q/K with GQA and RoPE


def _brute_units(head_dim, rotary_dim, rope):
    if rope == "half":
        rot = [(d, d + rotary_dim // 2) for d in range(rotary_dim // 2)]
    elif rope == "interleaved":
        rot = [(2 * i, 2 * i + 1) for i in range(rotary_dim // 2)]
    else:
        rot = [(d,) for d in range(rotary_dim)]
    return rot, [(d,) for d in range(rotary_dim, head_dim)]


def _brute_qk(xq, wq, bq, xk, wk, bk, mask, keep_rot, keep_pass, rope, rotary_dim):
    """Float64, loops over heads and units, python sorting: the definition, spelled out."""
    g = NH // NKV
    qn = _masked(_lin64(xq, wq, bq), mask).norm(dim=0)
    kn = _masked(_lin64(xk, wk, bk), mask).norm(dim=0)
    rot, passthrough = _brute_units(HD, rotary_dim, rope)
    dims_per_kv = []
    for j in range(NKV):
        score = {}
        for d in range(HD):
            qsum = sum(qn[h * HD + d].item() for h in range(NH) if h // g == j)
            score[d] = kn[j * HD + d].item() * qsum
        best_rot = sorted(rot, key=lambda u: -sum(score[d] for d in u))[:keep_rot]
        best_pass = sorted(passthrough, key=lambda u: -score[u[0]])[:keep_pass]
        dims_per_kv.append(sorted(d for u in best_rot + best_pass for d in u))
    idx_q = sorted(h * HD + d for h in range(NH) for d in dims_per_kv[h // g])
    idx_k = sorted(j * HD + d for j in range(NKV) for d in dims_per_kv[j])
    return idx_q, idx_k, dims_per_kv


QK_CASES = [
    # rope, rotary_dim, keep_rot, keep_pass
    ("half", 4, 1, 2),  # partial rotary
    ("half", 8, 2, 0),  # full rotary
    ("interleaved", 4, 1, 3),
    ("interleaved", 8, 3, 0),
    ("none", 8, 3, 0),
    ("none", 4, 2, 1),
]


@pytest.mark.parametrize("kind, params", EXACT)
@pytest.mark.parametrize("rope, rotary_dim, keep_rot, keep_pass", QK_CASES)
def test_select_qk_matches_brute_force(kind, params, rope, rotary_dim, keep_rot, keep_pass):
    x, mask = _batch(seed=18)
    wq, bq = _rand(NH * HD, HIDDEN, seed=19), _rand(NH * HD, seed=20)
    wk, bk = _rand(NKV * HD, HIDDEN, seed=21), _rand(NKV * HD, seed=22)
    idx_q, idx_k = S.select_qk(x, wq, bq, x, wk, bk, mask, keep_rot, keep_pass, NH, NKV, HD,
                               rope, rotary_dim, kind, **params)
    ref_q, ref_k, dims = _brute_qk(x, wq, bq, x, wk, bk, mask, keep_rot, keep_pass, rope, rotary_dim)
    keep_ch = S.qk_keep_channels(HD, rotary_dim, rope, keep_rot, keep_pass)
    assert idx_q.shape == (NH * keep_ch,) and idx_k.shape == (NKV * keep_ch,)
    assert idx_q.dtype == idx_k.dtype == torch.int64
    assert idx_q.tolist() == ref_q
    assert idx_k.tolist() == ref_k
    # RoPE pairs are kept or dropped together, in every head
    rot, _ = _brute_units(HD, rotary_dim, rope)
    for j in range(NKV):
        kept = set(dims[j])
        for unit in rot:
            assert all(d in kept for d in unit) or not any(d in kept for d in unit)


def test_select_qk_separate_inputs():
    """x_q and x_k may be different tensors (the ops only need the same token mask)."""
    xq, mask = _batch(seed=23)
    xk = _rand(*xq.shape, seed=24)
    wq, wk = _rand(NH * HD, HIDDEN, seed=25), _rand(NKV * HD, HIDDEN, seed=26)
    idx_q, idx_k = S.select_qk(xq, wq, None, xk, wk, None, mask, 1, 2, NH, NKV, HD, "half", 4,
                               "svd", rank=64)
    ref_q, ref_k, _ = _brute_qk(xq, wq, None, xk, wk, None, mask, 1, 2, "half", 4)
    assert idx_q.tolist() == ref_q and idx_k.tolist() == ref_k


def test_select_head_dims_pairs_win_by_their_sum():
    """A pair with one huge dim beats a pair of two moderate dims only if its sum is larger."""
    scores = torch.tensor([[5.0, 3.0, 0.1, 3.0]])  # rotate_half pairs (0, 2) = 5.1, (1, 3) = 6.0
    assert S.select_head_dims(scores, 1, 0, "half", 4).tolist() == [[1, 3]]
    assert S.select_head_dims(scores, 1, 0, "interleaved", 4).tolist() == [[0, 1]]  # 8.0 vs 3.1
    assert S.select_head_dims(scores, 1, 0, "none", 4).tolist() == [[0]]


@pytest.mark.parametrize(
    "rope, rotary_dim, keep_rot, keep_pass, match",
    [
        ("yarn", 4, 1, 1, "unknown RoPE layout"),
        ("half", 5, 1, 1, "must be even"),
        ("half", 10, 1, 1, "rotary_dim=10"),
        ("half", 4, 3, 1, "keep_rot=3"),
        ("half", 8, 1, 1, "keep_pass=1"),
        ("half", 4, 0, 0, "at least one"),
    ],
)
def test_select_qk_errors(rope, rotary_dim, keep_rot, keep_pass, match):
    x, mask = _batch(seed=27)
    wq, wk = _rand(NH * HD, HIDDEN, seed=28), _rand(NKV * HD, HIDDEN, seed=29)
    with pytest.raises(UnsupportedGraphError, match=match):
        S.select_qk(x, wq, None, x, wk, None, mask, keep_rot, keep_pass, NH, NKV, HD, rope,
                    rotary_dim)


def test_select_heads_must_group():
    x, mask = _batch(seed=30)
    with pytest.raises(UnsupportedGraphError, match="multiple of num_kv_heads"):
        S.select_vo(x, _rand(3 * HD, HIDDEN, seed=31), None, mask, 2, 4, 3, HD)


# ---------------------------------------------------------------------------------------------
# Op contracts: opcheck, autograd, torch.compile with dynamic token counts

OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor",
                 "test_aot_dispatch_dynamic")


def _op_cases():
    x, mask = _batch(seed=32)
    x = x.requires_grad_()
    w1, b1, w2 = _rand(24, HIDDEN, seed=33), _rand(24, seed=34), _rand(24, HIDDEN, seed=35)
    wq, wk, wv = (_rand(n * HD, HIDDEN, seed=s) for n, s in ((NH, 36), (NKV, 37), (NKV, 38)))
    return [
        (S.select_mlp, (x, w1, b1, w2, None, mask, 6, "silu", "svd", 4, 16, 0)),
        (S.select_mlp, (x, w1, None, None, None, None, 6, "relu2", "token_sample", 8, 5, 1)),
        (S.select_vo, (x, wv, None, mask, 5, NH, NKV, HD, "svd", 4, 16, 0)),
        (S.select_qk, (x, wq, None, x, wk, None, mask, 1, 2, NH, NKV, HD, "half", 4,
                       "token_sample", 8, 6, 2)),
    ]


@pytest.mark.parametrize("case", range(4))
def test_opcheck(case):
    op, args = _op_cases()[case]
    torch.library.opcheck(op, args, test_utils=OPCHECK_UTILS)


def test_ops_registered_in_sparselora_namespace():
    for name in ("select_mlp", "select_vo", "select_qk"):
        assert hasattr(torch.ops.sparselora, name)


def test_ops_compile_fwd_bwd_dynamic_tokens_no_recompiles():
    in_f = 5  # distinct from every token count (duck sizing)
    w1, w2 = _rand(24, in_f, seed=39), _rand(24, in_f, seed=40)
    wq, wk, wv = (_rand(n * HD, in_f, seed=s) for n, s in ((NH, 41), (NKV, 42), (NKV, 43)))

    def step(x, mask):
        idx = S.select_mlp(x, w1, None, w2, None, mask, 6, "silu", "token_sample", 8, 16, 0)
        idx_v, idx_o = S.select_vo(x, wv, None, mask, 4, NH, NKV, HD, "svd", 3, 16, 0)
        idx_q, idx_k = S.select_qk(x, wq, None, x, wk, None, mask, 1, 2, NH, NKV, HD, "half", 4,
                                   "svd", 3, 16, 0)
        h = F.linear(x, w1.index_select(0, idx)) * F.linear(x, w2.index_select(0, idx))
        v = F.linear(x, wv.index_select(0, idx_v))
        q = F.linear(x, wq.index_select(0, idx_q))
        k = F.linear(x, wk.index_select(0, idx_k))
        loss = h.square().sum() + v.square().sum() + q.sum() * k.sum()
        return loss, torch.cat([idx, idx_v, idx_o, idx_q, idx_k])

    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, dynamic=True)
    for tokens in (7, 11, 19):
        x, mask = _batch(seed=tokens, tokens=tokens, in_f=in_f)
        x1 = x.clone().requires_grad_()
        x2 = x.clone().requires_grad_()
        loss1, idx1 = compiled(x1, mask)
        loss2, idx2 = step(x2, mask)
        loss1.backward()
        loss2.backward()
        assert torch.equal(idx1, idx2)
        torch.testing.assert_close(loss1, loss2)
        torch.testing.assert_close(x1.grad, x2.grad)
    assert counter.frame_count == 1


def test_sampled_estimator_in_op_excludes_padding():
    """token_sample in the op: padding never picked while enough real tokens exist."""
    x, mask = _batch(seed=44, tokens=20)
    w1 = _rand(24, HIDDEN, seed=45)
    est = E.get_estimator("token_sample", samples=64, seed=0)
    scores = S.mlp_scores(x, w1, None, None, None, mask, "relu", est)
    truth = torch.relu(_masked(_lin64(x, w1, None), mask)).norm(dim=0)
    torch.testing.assert_close(scores.double(), truth, rtol=1e-5, atol=1e-5)


def test_column_l2_matches_vector_norm_and_reduces_low_precision_in_float32():
    torch.manual_seed(0)
    y = torch.randn(37, 53, dtype=torch.float64)
    torch.testing.assert_close(E.column_l2(y), torch.linalg.vector_norm(y, dim=0), rtol=1e-12, atol=0)
    torch.testing.assert_close(E.column_l2(y.t().contiguous().t()), E.column_l2(y), rtol=1e-12, atol=0)
    half = y.to(torch.bfloat16)
    out = E.column_l2(half)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.linalg.vector_norm(half.float(), dim=0))


def test_wall_time_hook_records_each_select_op_once_per_call():
    torch.manual_seed(0)
    x, w1, w2 = torch.randn(16, 8), torch.randn(12, 8), torch.randn(12, 8)
    wq, wk = torch.randn(8, 8), torch.randn(4, 8)
    with record_selections(picks=False, times=True) as rec:
        torch.ops.sparselora.select_mlp(x, w1, None, w2, None, None, 3, "silu", "token_sample", 8, 4, 0, 0.0)
        torch.ops.sparselora.select_vo(x, wk, None, None, 2, 2, 1, 4, "token_sample", 8, 4, 0, 0.0)
        torch.ops.sparselora.select_qk(x, wq, None, x, wk, None, None, 2, 0, 2, 1, 4, "half", 4,
                                       "svd", 2, 4, 0, 0.0)
    assert [op for op, _ in rec.times] == ["select_mlp", "select_vo", "select_qk"]
    assert all(0 < sec < 60 for _, sec in rec.times)
    assert rec.picks == []  # picks=False: the outputs are not copied
    torch.ops.sparselora.select_mlp(x, w1, None, w2, None, None, 3, "silu", "token_sample", 8, 4, 0, 0.0)
    assert len(rec.times) == 3  # closed: nothing more recorded
