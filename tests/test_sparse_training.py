"""End-to-end proof that the sparse training rewrite computes what SparseLoRA specifies.

Every exactness check runs in float64 against an eager reference written here (forward hooks on
the PEFT base layers that compute the oracle kept sets from the true activations and apply them by
masking), never against numbers copied from a previous run.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from sparselora_fx import backend
from sparselora_fx.counters import counters, record_selections
from sparselora_fx.counting import ExecutedFlops
from sparselora_fx.errors import SparseLoRAError
from sparselora_fx.models import build_tiny_model, tiny_batch

# ------------------------------------------------------------------------------------------ helpers


def _compile(model, *, dynamic=None, **options):
    options.setdefault("inner", "aot_eager")
    return torch.compile(model, backend="sparselora", options=options, dynamic=dynamic)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 when both are zero)."""
    scale = b.detach().abs().max().item()
    diff = (a.detach() - b.detach()).abs().max().item()
    return diff / scale if scale else diff


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _loss(fn, batch) -> torch.Tensor:
    """The task loss in the model's dtype (HF upcasts logits to float32 inside its own loss)."""
    out = fn(input_ids=batch["input_ids"])
    logits, labels = out.logits, batch["labels"]
    if logits.dim() == 2:  # sequence classification
        return F.cross_entropy(logits, labels)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def _step(fn, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward+backward; the loss and a copy of every LoRA gradient."""
    model = getattr(fn, "_orig_mod", fn)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # same dropout masks in every run compared
    loss = _loss(fn, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in _trainable(model).items()}
    return loss.detach(), grads


def _layers(model):
    return model.base_model.model.model.layers


# -------------------------------------------------- the eager oracle: Llama (GQA, rotate_half RoPE)


def _keep(n: int, s: float) -> int:
    return max(1, math.floor(n * (1 - s)))


def _topk_set(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(torch.topk(scores, k).indices).values


class LlamaOracle:
    """Forward hooks that pick each layer's kept channels from the true activations (float64,
    exact products, no estimator) and compute only those channels by masking the base layers.

    Masking is the exact sparse computation: a masked channel contributes nothing forward and
    receives no gradient, which is what computing only the kept channels means.
    """

    def __init__(self, model, sparsity: float):
        cfg = model.config
        self.h, self.kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.d = cfg.hidden_size // self.h
        self.s = sparsity
        self.sets: dict[tuple[int, str], tuple[torch.Tensor, ...]] = {}
        self.handles = []
        for i, layer in enumerate(_layers(model)):
            self._hook_layer(i, layer)

    def remove(self):
        for h in self.handles:
            h.remove()

    @staticmethod
    def _mask_cols(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        m = torch.zeros(t.shape[-1], dtype=t.dtype)
        m[idx] = 1
        return t * m

    def _hook_layer(self, i: int, layer) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        wq, wk = attn.q_proj.base_layer.weight, attn.k_proj.base_layer.weight
        wv = attn.v_proj.base_layer.weight
        wg, wu = mlp.gate_proj.base_layer.weight, mlp.up_proj.base_layer.weight
        h, kv, d, s = self.h, self.kv, self.d, self.s
        g = h // kv

        def pick_qk(mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            qn = (x @ wq.T).norm(dim=0).reshape(kv, g, d).sum(1)  # sum over q heads of group j
            kn = (x @ wk.T).norm(dim=0).reshape(kv, d)
            score = qn * kn
            half = d // 2
            pair = score[:, :half] + score[:, half:]  # rotate_half pairs (p, p + d/2)
            top = torch.stack([_topk_set(pair[j], _keep(half, s)) for j in range(kv)])
            dims = torch.sort(torch.cat([top, top + half], 1), 1).values  # [kv, keep_ch]
            idx_k = (torch.arange(kv)[:, None] * d + dims).reshape(-1)
            idx_q = (torch.arange(h)[:, None] * d + dims[torch.arange(h) // g]).reshape(-1)
            self.sets[(i, "qk")] = (idx_q, idx_k)

        def pick_v(mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            idx_v = _topk_set((x @ wv.T).norm(dim=0), _keep(kv * d, s))
            j, dd = idx_v // d, idx_v % d
            idx_o = torch.sort(((j[:, None] * g + torch.arange(g)) * d + dd[:, None]).reshape(-1)).values
            self.sets[(i, "vo")] = (idx_v, idx_o)

        def pick_mlp(mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            score = (F.silu(x @ wg.T) * (x @ wu.T)).norm(dim=0)
            self.sets[(i, "mlp")] = (_topk_set(score, _keep(wg.shape[0], s)),)

        def out_mask(key, which):
            return lambda mod, args, out: self._mask_cols(out, self.sets[key][which])

        def in_mask(key, which):
            return lambda mod, args: (self._mask_cols(args[0], self.sets[key][which]), *args[1:])

        hk = self.handles
        hk.append(attn.q_proj.base_layer.register_forward_pre_hook(pick_qk))
        hk.append(attn.q_proj.base_layer.register_forward_hook(out_mask((i, "qk"), 0)))
        hk.append(attn.k_proj.base_layer.register_forward_hook(out_mask((i, "qk"), 1)))
        hk.append(attn.v_proj.base_layer.register_forward_pre_hook(pick_v))
        hk.append(attn.v_proj.base_layer.register_forward_hook(out_mask((i, "vo"), 0)))
        hk.append(attn.o_proj.base_layer.register_forward_pre_hook(in_mask((i, "vo"), 1)))
        hk.append(mlp.gate_proj.base_layer.register_forward_pre_hook(pick_mlp))
        # down's base AND LoRA read only the kept columns: mask the whole PEFT module's input.
        hk.append(mlp.down_proj.register_forward_pre_hook(in_mask((i, "mlp"), 0)))


def _same_sets(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(torch.sort(a.reshape(-1)).values, torch.sort(b.reshape(-1)).values)


# ------------------------------------------------------------------------- 1. sparsity 0 is exact

ARCHS = [("llama", 2), ("qwen2", 1), ("mistral", 1), ("opt", 1), ("bert", 1)]


@pytest.mark.parametrize("arch,layers", ARCHS)
def test_sparsity_zero_runs_sparse_ops_and_matches_dense(arch, layers):
    batch = tiny_batch(arch)
    dense = build_tiny_model(arch, num_layers=layers, init_lora_b=True, dtype=torch.float64)
    loss_d, grads_d = _step(torch.compile(dense, backend="aot_eager"), batch)

    model = build_tiny_model(arch, num_layers=layers, init_lora_b=True, dtype=torch.float64)
    before = counters["sparselora"]["groups_rewritten"]
    with record_selections() as rec:
        loss_s, grads_s = _step(_compile(model, sparsity=0.0), batch)
    assert counters["sparselora"]["groups_rewritten"] > before
    assert rec.picks, "no sparselora selection op ran"
    for name, out in rec.picks:  # keep = N: every selection keeps every channel
        for idx in (out if isinstance(out, tuple) else (out,)):
            assert torch.equal(idx, torch.arange(idx.numel())), name
    assert _rel(loss_s, loss_d) < 1e-6
    worst = max(_rel(grads_s[n], grads_d[n]) for n in grads_d)
    assert worst < 1e-6, worst
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


# ------------------------------------------- 2. kept sets = oracle sets; loss = hand-masked eager


def test_full_rank_estimator_selects_oracle_sets_and_matches_masked_reference():
    s = 0.5
    batch = tiny_batch("llama")
    model = build_tiny_model("llama", num_layers=2, init_lora_b=True, dtype=torch.float64)
    with record_selections() as rec:
        loss_c, grads_c = _step(_compile(model, sparsity=s, estimator_rank=64), batch)

    ref = build_tiny_model("llama", num_layers=2, init_lora_b=True, dtype=torch.float64)
    oracle = LlamaOracle(ref, s)
    try:
        loss_r, grads_r = _step(ref, batch)
    finally:
        oracle.remove()

    for op, kind in (("select_qk", "qk"), ("select_vo", "vo"), ("select_mlp", "mlp")):
        got = rec.of(op)
        assert len(got) == 2, (op, len(got))
        for i, out in enumerate(got):
            out = out if isinstance(out, tuple) else (out,)
            want = oracle.sets[(i, kind)]
            assert len(out) == len(want)
            for a, b in zip(out, want):
                assert _same_sets(a, b), (op, i, a, b)
    assert rec.of("select_mlp")[0].numel() == 48 and rec.of("select_vo")[0][0].numel() == 16
    assert _rel(loss_c, loss_r) < 1e-10
    worst = max(_rel(grads_c[n], grads_r[n]) for n in grads_r)
    assert worst < 1e-9, worst
    # dropped MLP channels: their LoRA rows (gate/up B) and columns (down A) get exactly zero grad
    for i, layer in enumerate(_layers(model)):
        kept = rec.of("select_mlp")[i]
        dropped = torch.ones(96, dtype=torch.bool)
        dropped[kept] = False
        for proj in ("gate_proj", "up_proj"):
            gb = getattr(layer.mlp, proj).lora_B["default"].weight.grad
            assert gb[dropped].abs().max() == 0 and gb[~dropped].abs().max() > 0
        ga = layer.mlp.down_proj.lora_A["default"].weight.grad
        assert ga[:, dropped].abs().max() == 0 and ga[:, ~dropped].abs().max() > 0
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


# --------------------------------------------------- 3. gradients = finite differences (sparse)


def _rms_norm_in_input_dtype(self, hidden_states):
    """LlamaRMSNorm without its cast to float32, so a float64 model is float64 throughout."""
    var = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(var + self.variance_epsilon))


def test_lora_gradients_match_central_differences_of_sparse_loss(monkeypatch):
    from transformers.models.llama import modeling_llama

    # HF's RMSNorm computes in float32 even for float64 models: central differences at eps 1e-6
    # would measure float32 rounding, not the gradient.
    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", _rms_norm_in_input_dtype)
    batch = tiny_batch("llama")
    model = build_tiny_model("llama", num_layers=2, init_lora_b=True, dtype=torch.float64)
    f = _compile(model, sparsity=0.5)
    with record_selections() as rec0:
        _, grads = _step(f, batch)
    params = _trainable(model)
    gen = torch.Generator().manual_seed(1)
    eps = 1e-6
    worst = 0.0
    for _ in range(3):
        v = {n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in params.items()}
        analytic = sum((grads[n] * v[n]).sum() for n in params).item()
        losses = []
        for sign in (1, -1):
            with torch.no_grad():
                for n, p in params.items():
                    p.add_(v[n], alpha=sign * eps)
            with record_selections() as rec:
                losses.append(_loss(f, batch).item())  # grad mode on: the sparse graph runs
            with torch.no_grad():
                for n, p in params.items():
                    p.sub_(v[n], alpha=sign * eps)
            assert len(rec.picks) == len(rec0.picks)
            for (na, a), (nb, b) in zip(rec.picks, rec0.picks):
                assert na == nb and all(torch.equal(x, y) for x, y in zip(a if isinstance(a, tuple) else (a,),
                                                                         b if isinstance(b, tuple) else (b,)))
        fd = (losses[0] - losses[1]) / (2 * eps)
        err = abs(fd - analytic) / max(abs(analytic), 1e-3)
        worst = max(worst, err)
    assert worst < 1e-5, worst


# --------------------------------------------------------------------------------------- 4. FLOPs


def _flops(model, counter: ExecutedFlops, batch) -> tuple[int, int]:
    """(all FLOPs, FLOPs of the sparselora ops) of one compiled forward+backward step.

    FlopCounterMode cannot wrap a compiled call (Dynamo runs the frame eagerly under a dispatch
    mode), so the counting backend runs the compiled forward and backward graphs under it.
    """
    _loss(torch.compile(model, backend=counter), batch).backward()
    return counter.total, counter.by_prefix("sparselora.")


def test_mlp_frozen_flops_fall_by_the_configured_fraction():
    batch = tiny_batch("llama")
    layers, hidden, inter, r = 2, 64, 96, 4
    tokens = batch["input_ids"].numel()
    dense = build_tiny_model("llama", num_layers=layers, dtype=torch.float64)
    total_d, ours_d = _flops(dense, ExecutedFlops({"policy": "dense"}, rewrite=False), batch)
    torch._dynamo.reset()
    model = build_tiny_model("llama", num_layers=layers, dtype=torch.float64)
    total_s, ours_s = _flops(model, ExecutedFlops({"policy": {"defaults": {"mlp": 0.5}}}), batch)
    # frozen MLP GEMMs: 3 per layer, forward + input gradient, 2*T*in*out each
    frozen_mlp = layers * 3 * 2 * (2 * tokens * hidden * inter)
    # LoRA MLP GEMMs that follow the kept channels: gate/up B and down A, fwd + 2 bwd each
    lora_mlp = layers * 3 * 3 * (2 * tokens * inter * r)
    assert ours_d == 0
    assert ours_s == frozen_mlp // 2
    assert total_d - total_s == frozen_mlp // 2 + lora_mlp // 2


# ------------------------------------------------------------------------------------ 5. Inductor


def _losses(fn, arch, seqs):
    out = []
    for seq in seqs:
        torch.manual_seed(0)
        loss = _loss(fn, tiny_batch(arch, seq=seq))
        loss.backward()
        out.append(loss.detach())
    return out


@pytest.mark.inductor
def test_inductor_llama_dynamic_lengths_compile_once():
    seqs = (16, 24, 40)
    ref = build_tiny_model("llama", num_layers=1, init_lora_b=True)
    want = _losses(_compile(ref, sparsity=0.5, dynamic=True), "llama", seqs)
    torch._dynamo.reset()
    model = build_tiny_model("llama", num_layers=1, init_lora_b=True)
    compiled = _compile(model, sparsity=0.5, inner="inductor", dynamic=True)
    got = _losses(compiled, "llama", seqs[:1])
    n0, r0 = len(backend.LAST_REPORTS), counters["sparselora"]["groups_rewritten"]
    assert r0 >= 3
    got += _losses(compiled, "llama", seqs[1:])
    assert len(backend.LAST_REPORTS) == n0, "recompiled for a new sequence length"
    assert counters["sparselora"]["groups_rewritten"] == r0
    for a, b in zip(got, want):
        assert _rel(a, b) < 1e-5


@pytest.mark.inductor
@pytest.mark.parametrize("arch", ["opt", "bert"])  # the decoder family with biases; the encoder family
def test_inductor_matches_aot_eager(arch):
    batch = tiny_batch(arch)
    # dropout draws from Inductor's own RNG under Inductor: switch dropout off (eval mode:
    # gradients stay on, so the graph is still the sparse training graph)
    ref = build_tiny_model(arch, num_layers=1, init_lora_b=True).eval()
    want, _ = _step(_compile(ref, sparsity=0.5), batch)
    torch._dynamo.reset()
    model = build_tiny_model(arch, num_layers=1, init_lora_b=True).eval()
    r0 = counters["sparselora"]["groups_rewritten"]
    got, _ = _step(_compile(model, sparsity=0.5, inner="inductor"), batch)
    assert counters["sparselora"]["groups_rewritten"] > r0
    assert _rel(got, want) < 1e-5


# ------------------------------------------------------------------------ 6. eval / no_grad dense


def test_no_grad_runs_dense_unless_sparse_eval():
    batch = tiny_batch("llama")
    model = build_tiny_model("llama", num_layers=1, init_lora_b=True, dtype=torch.float64)
    with torch.no_grad():
        dense = _loss(model, batch)
    sparse = _loss(_compile(model, sparsity=0.5), batch).detach()  # grad on: sparse
    assert _rel(sparse, dense) > 1e-6, "the sparse run should differ from dense at sparsity 0.5"

    f = _compile(model, sparsity=0.5)
    with torch.no_grad(), record_selections() as rec:
        got = _loss(f, batch)
    assert not rec.picks
    assert _rel(got, dense) < 1e-12

    torch._dynamo.reset()
    g = _compile(model, sparsity=0.5, sparse_eval=True)
    model.eval()
    with torch.no_grad(), record_selections() as rec:
        got = _loss(g, batch)
    assert rec.picks
    assert _rel(got, sparse) < 1e-12


# ---------------------------------------------------------------------------------- 7. bad input


class _SplitInputMLP(torch.nn.Module):
    """A gated MLP whose gate and up read different tensors: no single kept set fits both."""

    def __init__(self):
        super().__init__()
        self.gate_proj = torch.nn.Linear(16, 24, bias=False)
        self.up_proj = torch.nn.Linear(16, 24, bias=False)
        self.down_proj = torch.nn.Linear(24, 16, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(torch.tanh(x)))


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = _SplitInputMLP()

    def forward(self, x):
        return self.mlp(x)


def test_unrewritable_group_falls_back_dense_with_one_warning(monkeypatch):
    import peft

    monkeypatch.delenv("SPARSELORA_STRICT", raising=False)
    torch.manual_seed(0)
    block = _Block().double()
    model = peft.get_peft_model(block, peft.LoraConfig(r=2, target_modules=["gate_proj", "up_proj", "down_proj"]))
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    want = model(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with record_selections() as rec:
            got = _compile(model, sparsity=0.5)(x)
    ours = [w for w in caught if "sparselora" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    msg = str(ours[0].message)
    assert "mlp" in msg and "different inputs" in msg
    assert not rec.picks
    assert _rel(got, want) < 1e-12


def test_nan_weight_stays_dense_with_a_warning(monkeypatch):
    monkeypatch.delenv("SPARSELORA_STRICT", raising=False)
    batch = tiny_batch("llama")
    model = build_tiny_model("llama", num_layers=1, init_lora_b=True, dtype=torch.float64)
    with torch.no_grad():
        _layers(model)[0].mlp.up_proj.base_layer.weight[3, 5] = float("nan")
    before = counters["sparselora"]["groups_rewritten"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with record_selections() as rec:
            _loss(_compile(model, sparsity=0.5), batch).backward()
    ours = [str(w.message) for w in caught if "sparselora" in str(w.message)]
    assert len(ours) == 1, ours
    assert "layers.0.mlp" in ours[0] and "NaN" in ours[0]
    assert counters["sparselora"]["groups_rewritten"] - before == 2  # q/k and v/o still sparse
    assert {name for name, _ in rec.picks} == {"select_qk", "select_vo"}


@pytest.mark.parametrize("bad", [1.2, -0.1, 1.0])
def test_sparsity_outside_unit_interval_is_an_error_naming_it(bad):
    model = build_tiny_model("llama", num_layers=1)
    with pytest.raises(Exception) as info:
        _compile(model, sparsity=bad)(**tiny_batch("llama"))
    err = info.value
    while err is not None and not isinstance(err, SparseLoRAError):
        err = err.__cause__ or err.__context__
    assert isinstance(err, SparseLoRAError), info.value
    assert repr(bad) in str(err)


# ------------------------------------------- 8. hand-written LoRA with the bias add as its own op


class _BiasAfterProduct(torch.nn.Module):
    """``y = x @ W.T; y = y + b; out = y + (x @ A.T) @ B.T * s`` (W, b, g frozen; A, B trained),
    optionally with a per-channel scale ``y * g`` after the bias."""

    def __init__(self, d_in: int, d_out: int, scale: bool = False, r: int = 4):
        super().__init__()
        f64 = torch.float64
        self.weight = torch.nn.Parameter(torch.randn(d_out, d_in, dtype=f64) / d_in**0.5, requires_grad=False)
        self.bias = torch.nn.Parameter(torch.randn(d_out, dtype=f64) * 0.5, requires_grad=False)
        self.g = torch.nn.Parameter(torch.rand(d_out, dtype=f64) + 0.5, requires_grad=False) if scale else None
        self.A = torch.nn.Parameter(torch.randn(r, d_in, dtype=f64) * 0.3)
        self.B = torch.nn.Parameter(torch.randn(d_out, r, dtype=f64) * 0.3)

    def forward(self, x):
        y = x @ self.weight.T
        y = y + self.bias
        if self.g is not None:
            y = y * self.g
        return y + (x @ self.A.T) @ self.B.T * 0.5


class M(torch.nn.Module):
    """A gated MLP of hand-written LoRA layers. ``kept`` set: the eager reference, the kept
    intermediate channels applied by masking (down's base and LoRA then read only those)."""

    def __init__(self, scale: str = ""):
        super().__init__()
        self.gate = _BiasAfterProduct(16, 32, scale == "gate")
        self.up = _BiasAfterProduct(16, 32)
        self.down = _BiasAfterProduct(32, 16, scale == "down")
        self.kept: torch.Tensor | None = None

    def forward(self, x):
        h = F.silu(self.gate(x)) * self.up(x)
        if self.kept is not None:
            m = torch.zeros(h.shape[-1], dtype=h.dtype)
            m[self.kept] = 1
            h = h * m
        return self.down(h)


def _hand_step(model, fn, x):
    model.zero_grad(set_to_none=True)
    loss = fn(x).pow(2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in _trainable(model).items()}


def _fresh(scale: str = "") -> M:
    torch.manual_seed(0)
    return M(scale)


@pytest.mark.parametrize("scale", ["", "down"])  # a per-channel scale on down: it reads columns, exact too
def test_hand_written_lora_with_a_separate_bias_add_forms_its_mlp_group_and_trains_exactly(scale):
    x = torch.randn(2, 6, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    options = {"inner": "aot_eager", "progress": False}

    eager = _fresh(scale)
    loss_e, grads_e = _hand_step(eager, eager, x)
    model = _fresh(scale)
    backend.LAST_REPORTS.clear()
    with record_selections() as rec:
        loss_0, grads_0 = _hand_step(model, torch.compile(model, backend="sparselora",
                                                          options={**options, "sparsity": 0.0}), x)
    report = backend.LAST_REPORTS[-1]
    assert sorted(u.fqn for u in report.units) == ["down", "gate", "up"]
    assert [(g.kind, len(g.units)) for g in report.groups] == [("gated_mlp", 3)] and not report.skipped
    assert [name for name, _ in rec.picks] == ["select_mlp"]
    assert _rel(loss_0, loss_e) < 1e-10
    assert max(_rel(grads_0[n], grads_e[n]) for n in grads_e) < 1e-10

    torch._dynamo.reset()
    model = _fresh(scale)
    before = counters["sparselora"]["groups_rewritten"]
    with record_selections() as rec:
        loss_s, grads_s = _hand_step(model, torch.compile(model, backend="sparselora",
                                                          options={**options, "sparsity": 0.5}), x)
    assert counters["sparselora"]["groups_rewritten"] - before == 1
    (kept,) = rec.of("select_mlp")
    assert kept.numel() == 16
    ref = _fresh(scale)
    ref.kept = kept
    loss_r, grads_r = _hand_step(ref, ref, x)
    assert _rel(loss_s, loss_e) > 1e-6, "sparsity 0.5 should differ from dense"
    assert _rel(loss_s, loss_r) < 1e-10
    assert max(_rel(grads_s[n], grads_r[n]) for n in grads_r) < 1e-10
    dropped = torch.ones(32, dtype=torch.bool)
    dropped[kept] = False
    assert grads_s["gate.B"][dropped].abs().max() == 0 and grads_s["down.A"][:, dropped].abs().max() == 0


def test_per_channel_scale_on_a_scored_projection_keeps_the_mlp_dense_with_the_reason(monkeypatch):
    monkeypatch.delenv("SPARSELORA_STRICT", raising=False)
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    eager = _fresh("gate")
    want = eager(x)
    model = _fresh("gate")
    backend.LAST_REPORTS.clear()
    with warnings.catch_warnings(record=True) as caught, record_selections() as rec:
        warnings.simplefilter("always")
        got = torch.compile(model, backend="sparselora",
                            options={"inner": "aot_eager", "sparsity": 0.5, "progress": False})(x)
    report = backend.LAST_REPORTS[-1]
    assert sorted(u.fqn for u in report.units) == ["down", "gate", "up"]  # matched, and said why dense
    assert [s.reason for s in report.skipped if "scaled by" in s.reason and "gate" in s.reason]
    assert len([w for w in caught if "sparselora" in str(w.message)]) == 1
    assert not rec.picks
    assert _rel(got, want) < 1e-12


def test_hand_written_attention_with_separate_bias_adds_matches_the_f_linear_spelling(monkeypatch):
    """q/k/v's kept channels are scattered to full width: a bias added after the product must
    leave the dropped channels zero, as ``F.linear(x, W, b)``'s bias inside the sparse op does,
    with every token sparse and with the output tokens dense."""
    from sparselora_fx.passes import tokens
    from sparselora_fx.policy import Policy
    from tests.passes import test_attention_groups as attn

    def forward(self, x):
        if self.separate:
            y = x @ self.weight.T
            y = (self.bias + y) if self.spelling == "linear" else y + self.bias
        else:
            y = F.linear(x, self.weight, self.bias)
        return y + (x @ self.lora_A.T) @ self.lora_B.T * 0.5

    monkeypatch.setattr(attn.LoraLinear, "forward", forward)

    def run(separate: bool, mode: str, spelling: str):
        torch.manual_seed(0)
        block = attn.Block(rope="half", spelling=spelling).double()
        for mod in block.modules():
            if isinstance(mod, attn.LoraLinear):
                mod.bias = torch.nn.Parameter(torch.randn(mod.weight.shape[0], dtype=torch.float64),
                                              requires_grad=False)
                mod.separate = separate
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(2, 6, attn.HIDDEN, dtype=torch.float64, generator=gen)
        cos, sin = attn.rope_tables("half", attn.HEAD_DIM, 6, torch.float64)
        out_mask = torch.zeros(2, 6, dtype=torch.bool)
        out_mask[0, 2:4] = out_mask[1, 5] = True

        def step(x, cos, sin, out_mask):
            tokens.mark_output_tokens(out_mask)
            return block(x, cos, sin)

        policy = Policy(attn_qk=0.5, attn_vo=0.5, tokens=mode, dense_tokens=2)
        torch._dynamo.reset()
        backend.LAST_REPORTS.clear()
        tokens.reset_token_stats()
        with record_selections() as rec:
            out = torch.compile(step, backend="sparselora",
                                options={"policy": policy, "inner": "aot_eager", "progress": False})(
                x, cos, sin, out_mask)
            out.pow(2).sum().backward()
        assert [(g.kind, g.sparsity) for g in backend.LAST_REPORTS[-1].groups] == [("attn_qk", 0.5),
                                                                                 ("attn_vo", 0.5)]
        assert tokens.token_stats().calls == (mode == "output_dense")
        grads = {n: p.grad for n, p in block.named_parameters() if p.requires_grad}
        return out.detach(), grads, rec.picks

    for mode in ("all_sparse", "output_dense"):
        for spelling in ("linear", "matmul"):  # separate: `b + y` / `y + b`
            want, grads_w, picks_w = run(False, mode, spelling)
            got, grads_g, picks_g = run(True, mode, spelling)
            assert [n for n, _ in picks_g] == [n for n, _ in picks_w] == ["select_qk", "select_vo"]
            assert all(torch.equal(a, b) for (_, pa), (_, pb) in zip(picks_g, picks_w) for a, b in zip(pa, pb))
            assert _rel(got, want) < 1e-10
            assert max(_rel(grads_g[n], grads_w[n]) for n in grads_w) < 1e-10
