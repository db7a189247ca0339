"""The sympy FLOPs model against FlopCounterMode counts of real float64 eager computations.

Dense LoRA: a tiny GQA LlamaForCausalLM (gated MLP) and a tiny OPTForCausalLM (plain MLP, biases,
tied LM head) with PEFT LoRA, forward and backward of the LM loss, counted per op kind (GEMMs:
mm/addmm/bmm/baddbmm; SDPA). Together they cover every term of the dense model: q/k/v/o, gate/up/
down and fc1/fc2 frozen GEMMs with the layer-0 dX skip, LoRA A/B dW and dX, SDPA forward and
backward (non-causal, as FlopCounterMode counts), and the LM head. BERT's pooler/classifier heads
are not modelled, so BERT is only checked through `from_hf_config`.

SparseLoRA: the graph rewrite cannot be counted yet, so the sliced GEMMs are written out in eager
torch here (index-selected weights, token split) and counted; plus internal consistency checks.
"""

from __future__ import annotations

import dataclasses

import pytest
import sympy
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from sparselora_fx.errors import SparseLoRAError
from sparselora_fx.flops import (
    PARTS,
    SYMBOLS,
    FlopsModelError,
    LayerShape,
    evaluate,
    flops_dense_lora,
    flops_sparselora,
    ideal_speedup,
    unit_dense_flops_per_token,
)

DT = torch.float64
GEMM_OPS = {"mm", "addmm", "bmm", "baddbmm"}


# --------------------------------------------------------------------------- counting helpers


def _broadcast_kv(q, k):
    """KV shapes with heads broadcast to the query heads (older torch asserts equal heads)."""
    return (q[0], q[1], *k[2:])


def _sdpa_fwd(q, k, v, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(q, _broadcast_kv(q, k), _broadcast_kv(q, v))


def _sdpa_bwd(grad_out, q, k, v, *args, out_shape=None, **kwargs):
    return sdpa_backward_flop_count(grad_out, q, _broadcast_kv(q, k), _broadcast_kv(q, v))


def _custom_mapping():
    """Count the CPU flash-attention ops with torch's own SDPA formulas (none are registered)."""
    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_fwd
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _sdpa_bwd
    return mapping


def _counter():
    return FlopCounterMode(display=False, custom_mapping=_custom_mapping())


def _by_kind(counter: FlopCounterMode) -> dict[str, int]:
    """Split a count into GEMM and SDPA totals; fail on any other FLOP-counted op."""
    out = {"gemm": 0, "sdpa": 0}
    for op, flops in counter.get_flop_counts().get("Global", {}).items():
        name = str(op).split(".")[-1]
        if name in GEMM_OPS:
            out["gemm"] += flops
        elif "attention" in name:
            out["sdpa"] += flops
        else:
            raise AssertionError(f"unexpected FLOP-counted op {op}")
    return out


def _count_train_step(model, input_ids) -> tuple[dict[str, int], dict[str, int]]:
    with _counter() as fwd_counter:
        loss = model(input_ids=input_ids, labels=input_ids).loss
    with _counter() as bwd_counter:
        loss.backward()
    return _by_kind(fwd_counter), _by_kind(bwd_counter)


def _assert_matches(model_flops: dict, fwd: dict, bwd: dict) -> None:
    n = evaluate(model_flops)
    assert fwd["sdpa"] == n["sdpa_fwd"] > 0
    assert bwd["sdpa"] == n["sdpa_bwd"]
    assert fwd["gemm"] == n["fwd"] - n["sdpa_fwd"]
    assert bwd["gemm"] == n["bwd"] - n["sdpa_bwd"]
    assert fwd["gemm"] + bwd["gemm"] + fwd["sdpa"] + bwd["sdpa"] == n["total"]
    assert n["sdpa"] == n["sdpa_noncausal"]  # the default reports what FlopCounterMode counts


# ------------------------------------------------------------ dense vs FlopCounterMode

LLAMA_ROLES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o",
               "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


@pytest.mark.parametrize(
    "targets",
    [
        sorted(LLAMA_ROLES),
        ["q_proj", "v_proj"],  # PEFT's LLaMA default: k and o frozen, layer 0 partly gradient-free
        ["gate_proj", "up_proj", "down_proj"],  # no SDPA backward in layer 0
    ],
    ids=["all", "qv", "mlp"],
)
def test_dense_lora_matches_flop_counter_llama_gqa(targets):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=2, vocab_size=128, max_position_embeddings=32,
    )
    model = transformers.LlamaForCausalLM(config).to(DT)
    model = peft.get_peft_model(
        model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets)
    )
    B, S = 2, 7
    fwd, bwd = _count_train_step(model, torch.randint(0, 128, (B, S)))

    roles = [LLAMA_ROLES[t] for t in targets]
    shape = LayerShape.from_hf_config(config, lora_rank=4, lora_targets=roles)
    assert (shape.nh, shape.nkv, shape.D, shape.gated) == (4, 2, 16, True)
    # layer 0 reads frozen embeddings: its input needs no gradient
    _assert_matches(flops_dense_lora(shape, B, S, n_layers=2, input_grad=False), fwd, bwd)


def test_dense_lora_matches_flop_counter_opt_plain_mlp():
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = transformers.OPTConfig(
        hidden_size=32, ffn_dim=80, num_attention_heads=4, num_hidden_layers=2, vocab_size=96,
        word_embed_proj_dim=32, max_position_embeddings=32,
    )
    model = transformers.OPTForCausalLM(config).to(DT)
    targets = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
    model = peft.get_peft_model(
        model, peft.LoraConfig(r=3, lora_alpha=6, lora_dropout=0.0, target_modules=targets)
    )
    B, S = 3, 5
    fwd, bwd = _count_train_step(model, torch.randint(0, 96, (B, S)))

    shape = LayerShape.from_hf_config(config, lora_rank=3)
    assert (shape.gated, shape.I, shape.nkv, shape.lora_targets) == (
        False, 80, 4, frozenset({"q", "k", "v", "o", "up", "down"})
    )
    _assert_matches(flops_dense_lora(shape, B, S, n_layers=2, input_grad=False), fwd, bwd)


# --------------------------------------------------------------------------- sparse vs eager slices


def _randn(*shape, grad=False):
    return torch.randn(*shape, dtype=DT, requires_grad=grad)


def _sparse_proj(xs, xd, x, W, A, Bm, rows):
    """Frozen W on kept rows for sparse tokens, full for dense ones; LoRA B sliced alike."""
    a = x @ A.T
    ns = xs.shape[0]
    s = xs @ W[rows].T + a[:ns] @ Bm[rows].T
    d = xd @ W.T + a[ns:] @ Bm.T
    return s, d


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("s_mlp", [0.75, 0.6])  # keep 3 (exact) and floor(12*0.4) = 4
def test_sparse_mlp_matches_eager_sliced_gemms(gated, s_mlp):
    torch.manual_seed(0)
    T, H, I, r, f_out = 8, 8, 12, 2, 0.25
    ts = int(T * (1 - f_out))
    keep = max(1, int(I * (1.0 - s_mlp)))
    x = _randn(T, H, grad=True)
    Wg, Wu, Wd = _randn(I, H), _randn(I, H), _randn(H, I)
    Ag, Bg = _randn(r, H, grad=True), _randn(I, r, grad=True)
    Au, Bu = _randn(r, H, grad=True), _randn(I, r, grad=True)
    Ad, Bd = _randn(r, I, grad=True), _randn(H, r, grad=True)
    rows = torch.randperm(I)[:keep]
    with _counter() as fc_fwd:
        xs, xd = x[:ts], x[ts:]
        us, ud = _sparse_proj(xs, xd, x, Wu, Au, Bu, rows)
        if gated:
            gs, gd = _sparse_proj(xs, xd, x, Wg, Ag, Bg, rows)
            hs, hd = F.silu(gs) * us, F.silu(gd) * ud
        else:
            hs, hd = F.relu(us), F.relu(ud)
        a = torch.cat([hs @ Ad[:, rows].T, hd @ Ad.T])
        y = torch.cat([hs @ Wd[:, rows].T, hd @ Wd.T]) + a @ Bd.T
        loss = (y * y).sum()
    with _counter() as fc_bwd:
        loss.backward()

    targets = {"gate", "up", "down"} if gated else {"up", "down"}
    shape = LayerShape(H=H, I=I, nh=1, nkv=1, D=4, V=0, r=r, gated=gated, lora_targets=targets)
    n = evaluate(flops_sparselora(shape, 1, T, s_mlp, None, None, f_out, 4))
    assert _by_kind(fc_fwd)["gemm"] == n["mlp_fwd"] + n["lora_fwd"]
    assert _by_kind(fc_bwd)["gemm"] == n["mlp_bwd"] + n["lora_bwd"]


def _repeat_kv(t, groups):
    """[T, nkv*D] -> [T, nh*D], kv head j serving q heads j*groups .. j*groups+groups-1."""
    T, width = t.shape
    return t.view(T, -1, 1, 4).expand(-1, -1, groups, -1).reshape(T, width * groups)


def test_sparse_attention_projections_match_eager_sliced_gemms():
    torch.manual_seed(0)
    T, H, nh, nkv, D, r, f_out = 8, 8, 4, 2, 4, 2, 0.5
    s_qk, s_vo = 0.5, 0.75
    ts = int(T * (1 - f_out))
    groups = nh // nkv
    kqk, kvo = int(D * (1 - s_qk)), int(nkv * D * (1 - s_vo))
    head_ch = torch.arange(kqk)  # same head-dim channels for every head
    q_rows = (torch.arange(nh)[:, None] * D + head_ch).flatten()
    k_rows = (torch.arange(nkv)[:, None] * D + head_ch).flatten()
    v_rows = torch.randperm(nkv * D)[:kvo]
    # kv channel (j, d) feeds attention-output channel (h, d) for every h in group j
    o_cols = torch.cat([(v_rows // D) * groups * D + g * D + v_rows % D for g in range(groups)])
    assert o_cols.numel() == nh * D * (1 - s_vo)
    x = _randn(T, H, grad=True)
    W = {"q": _randn(nh * D, H), "k": _randn(nkv * D, H), "v": _randn(nkv * D, H),
         "o": _randn(H, nh * D)}
    A = {n: _randn(r, w.shape[1], grad=True) for n, w in W.items()}
    Bm = {n: _randn(w.shape[0], r, grad=True) for n, w in W.items()}

    def full(name, inp, rows):
        """Sparse tokens: kept output rows scattered into full width; LoRA full width."""
        kept = inp[:ts] @ W[name][rows].T
        base_s = torch.zeros(ts, W[name].shape[0], dtype=DT).index_copy(1, rows, kept)
        base = torch.cat([base_s, inp[ts:] @ W[name].T])
        return base + (inp @ A[name].T) @ Bm[name].T

    with _counter() as fc_fwd:
        q, k, v = full("q", x, q_rows), full("k", x, k_rows), full("v", x, v_rows)
        att = q * _repeat_kv(k, groups) + _repeat_kv(v, groups)  # elementwise: no GEMM
        o_base = torch.cat([att[:ts, o_cols] @ W["o"][:, o_cols].T, att[ts:] @ W["o"].T])
        y = o_base + (att @ A["o"].T) @ Bm["o"].T
        loss = (y * y).sum()
    with _counter() as fc_bwd:
        loss.backward()

    shape = LayerShape(H=H, I=4, nh=nh, nkv=nkv, D=D, V=0, r=r, lora_targets={"q", "k", "v", "o"})
    n = evaluate(flops_sparselora(shape, 1, T, None, s_qk, s_vo, f_out, 4))
    assert _by_kind(fc_fwd)["gemm"] == n["attn_proj_fwd"] + n["lora_fwd"]
    assert _by_kind(fc_bwd)["gemm"] == n["attn_proj_bwd"] + n["lora_bwd"]


@pytest.mark.parametrize("gated", [True, False])
def test_estimator_cost_matches_counted_estimates(gated):
    torch.manual_seed(0)
    T, H, I, nh, nkv, D, k, m = 6, 8, 12, 4, 2, 4, 3, 4
    x = _randn(T, H)
    outs = {"q": nh * D, "k": nkv * D, "v": nkv * D, "gate": I, "up": I}
    projected = ["gate", "up", "q", "k", "v"] if gated else ["up", "q", "k", "v"]
    with torch.no_grad(), _counter() as fc_svd:
        for name in projected:
            _ = (x @ _randn(H, k)) @ _randn(k, outs[name])
    with torch.no_grad(), _counter() as fc_sample:
        for name in projected:
            _ = x[:m] @ _randn(outs[name], H).T
    shape = LayerShape(H=H, I=I, nh=nh, nkv=nkv, D=D, V=0, r=2, gated=gated)
    svd = evaluate(flops_sparselora(shape, 2, 3, 0.5, 0.5, 0.5, 0, k))
    sample = evaluate(flops_sparselora(shape, 2, 3, 0.5, 0.5, 0.5, 0, None, "sample", m))
    assert svd["estimator"] == _by_kind(fc_svd)["gemm"]
    assert sample["estimator"] == _by_kind(fc_sample)["gemm"]


def test_unit_dense_flops_per_token_matches_a_linear():
    layer = torch.nn.Linear(24, 40, dtype=DT)
    with _counter() as fc:
        layer(_randn(1, 24))
    assert unit_dense_flops_per_token(24, 40) == _by_kind(fc)["gemm"]
    with pytest.raises(FlopsModelError, match="in_features"):
        unit_dense_flops_per_token(0, 4)


# --------------------------------------------------------------------------- internal consistency

SYM = LayerShape.symbolic()
B_, S_, k_ = SYMBOLS["B"], SYMBOLS["S"], SYMBOLS["k"]


def _zero(expr) -> bool:
    return sympy.simplify(expr) == 0


@pytest.mark.parametrize("n_layers,input_grad", [(1, True), (SYMBOLS["L"], False)])
def test_no_sparsity_and_no_dense_tokens_is_dense_plus_estimator(n_layers, input_grad):
    dense = flops_dense_lora(SYM, B_, S_, n_layers=n_layers, input_grad=input_grad)
    sparse = flops_sparselora(SYM, B_, S_, 0, 0, 0, 0, k_, n_layers=n_layers, input_grad=input_grad)
    for key in PARTS:
        if key != "estimator":
            assert _zero(sparse[key] - dense[key]), key
    assert not _zero(sparse["estimator"])
    assert _zero(sparse["total"] - dense["total"] - sparse["estimator"])


def test_all_dense_tokens_is_dense_plus_estimator_at_any_sparsity():
    s = SYMBOLS
    dense = flops_dense_lora(SYM, B_, S_)
    for est in ({"k": k_}, {"k": None, "estimator": "sample", "samples": s["m"]}):
        sparse = flops_sparselora(SYM, B_, S_, s["s_mlp"], s["s_qk"], s["s_vo"], 1, **est)
        assert _zero(sparse["total"] - dense["total"] - sparse["estimator"])
        assert sparse["estimator"].free_symbols >= {s["H"], s["I"], s["D"]}


@pytest.mark.parametrize("s", [0.25, 0.5, 0.75, 0.875])
def test_frozen_gemms_scale_with_kept_fraction(s):
    shape = LayerShape(H=64, I=96, nh=4, nkv=2, D=16, V=128, r=4)
    dense = flops_dense_lora(shape, B_, S_)
    sparse = flops_sparselora(shape, B_, S_, s, s, s, 0, 8)
    kept = 1 - sympy.Rational(str(s))
    for key in ("mlp_fwd", "mlp_bwd", "attn_proj_fwd", "attn_proj_bwd"):
        assert _zero(sparse[key] - kept * dense[key]), key
    for key in ("sdpa", "lm_head"):
        assert _zero(sparse[key] - dense[key]), key
    # LoRA shrinks only through the sliced MLP factors (B rows of gate/up, A columns of down)
    assert 0 < evaluate({"d": dense["lora"] - sparse["lora"]}, B=2, S=8)["d"]


@pytest.mark.parametrize("I, s, keep", [(100, 0.9, 10), (100, 0.01, 99), (96, 0.333, 64), (7, 0.99, 1),
                                         (4864, 0.97, 145)])
def test_mlp_keep_follows_the_runtime_rule(I, s, keep):
    """The runtime keeps max(1, floor(N * (1 - s))) channels, exact on the decimal as written."""
    shape = LayerShape(H=8, I=I, nh=1, nkv=1, D=8, V=0, r=0)
    per_channel = evaluate(flops_dense_lora(shape, 1, 1))["mlp_fwd"] // I
    direct = flops_sparselora(shape, 1, 1, s, None, None, 0, 2)["mlp_fwd"]
    late = evaluate(flops_sparselora(shape, 1, 1, SYMBOLS["s_mlp"], None, None, 0, 2), s_mlp=s)
    assert int(direct) == late["mlp_fwd"] == keep * per_channel


def test_causal_halves_sdpa_only():
    shape = LayerShape(H=64, I=96, nh=4, nkv=2, D=16, V=128, r=4)
    full = evaluate(flops_dense_lora(shape, 2, 8))
    causal = evaluate(flops_dense_lora(shape, 2, 8, causal=True))
    assert 2 * causal["sdpa"] == full["sdpa"] == full["sdpa_noncausal"] == 2 * full["sdpa_causal"]
    assert causal["sdpa"] == causal["sdpa_causal"]
    assert full["total"] - causal["total"] == causal["sdpa"]


def test_totals_are_sums_of_parts_and_layers():
    one = flops_sparselora(SYM, B_, S_, 0.5, 0.25, 0.5, 0.125, k_)
    assert _zero(one["total"] - sum(one[p] for p in PARTS))
    many = flops_sparselora(SYM, B_, S_, 0.5, 0.25, 0.5, 0.125, k_, n_layers=SYMBOLS["L"])
    per_layer = one["total"] - one["lm_head"]
    assert _zero(many["total"] - SYMBOLS["L"] * per_layer - one["lm_head"])


def test_ideal_speedup():
    shape = LayerShape(H=512, I=1536, nh=8, nkv=4, D=64, V=1024, r=16)
    args = (shape, 4, 128)
    assert ideal_speedup(*args, None, None, None, 0, None) == 1.0
    speedup = ideal_speedup(*args, 0.9, 0.5, 0.5, 0.1, 8, n_layers=4)
    dense = evaluate(flops_dense_lora(shape, 4, 128, n_layers=4))["total"]
    sparse = evaluate(flops_sparselora(shape, 4, 128, 0.9, 0.5, 0.5, 0.1, 8, n_layers=4))["total"]
    assert speedup == pytest.approx(dense / sparse, rel=1e-12)
    assert speedup > 1
    assert ideal_speedup(*args, 0.95, 0.5, 0.5, 0.1, 8, n_layers=4) > speedup  # sparser: faster
    values = {"B": 4, "S": 128, "H": 512, "I": 1536, "nh": 8, "nkv": 4, "D": 64, "V": 1024, "r": 16}
    sym = ideal_speedup(SYM, B_, S_, 0.9, 0.5, 0.5, 0.1, 8, n_layers=4, values=values)
    assert sym == pytest.approx(speedup, rel=1e-12)


# --------------------------------------------------------------------------- configs and errors


def test_from_hf_config_reads_known_families():
    llama = {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
             "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 1000}
    shape = LayerShape.from_hf_config(llama, lora_rank=8)
    assert (shape.H, shape.I, shape.nh, shape.nkv, shape.D, shape.r, shape.gated) == (
        896, 4864, 14, 2, 896 // 14, 8, True)
    bert = {"model_type": "bert", "hidden_size": 64, "intermediate_size": 256,
            "num_attention_heads": 4, "vocab_size": 100}
    shape = LayerShape.from_hf_config(bert, lora_rank=2, lora_targets={"q", "v"})
    assert (shape.gated, shape.nkv, shape.D, shape.lora_targets) == (False, 4, 16, {"q", "v"})
    no_head = dataclasses.replace(shape, V=0)
    assert evaluate(flops_dense_lora(no_head, 1, 4))["lm_head"] == 0


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: LayerShape.from_hf_config({"model_type": "gpt2"}, 4), "gpt2"),
        (lambda: LayerShape(H=8, I=8, nh=3, nkv=2, D=4, V=0, r=1), "multiple"),
        (lambda: LayerShape(H=8, I=8, nh=2, nkv=2, D=4, V=0, r=1, gated=False,
                            lora_targets={"gate"}), "gate"),
        (lambda: LayerShape(H=8, I=8, nh=2, nkv=2, D=4, V=0, r=1, lora_targets={"qkv"}), "qkv"),
        (lambda: flops_sparselora(SYM, 1, 1, 1.0, None, None, 0, 8), "s_mlp"),
        (lambda: flops_sparselora(SYM, 1, 1, 0.5, None, None, 1.5, 8), "f_out"),
        (lambda: flops_sparselora(SYM, 1, 1, 0.5, None, None, 0, None), "rank k"),
        (lambda: flops_sparselora(SYM, 1, 1, 0.5, None, None, 0, 8, "sample"), "samples"),
        (lambda: flops_sparselora(SYM, 1, 1, 0.5, None, None, 0, 8, "topk"), "topk"),
        (lambda: evaluate(flops_dense_lora(SYM, 1, 1)), "still depends"),
        (lambda: evaluate({}, Hidden=3), "Hidden"),
    ],
)
def test_errors_say_what_was_wrong(call, match):
    with pytest.raises(SparseLoRAError, match=match):
        call()
