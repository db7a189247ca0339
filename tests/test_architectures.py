"""Every architecture in the README's table, end to end: the groups the backend finds, and that the
sparse ops at sparsity 0 (every channel kept) train exactly like plain ``torch.compile``.

One row per architecture, tiny random-weight config (2 layers, batch 2, seq 12), float64, inner
``aot_eager``: the loss and every LoRA gradient must match within 1e-6 relative, and the report
must hold exactly the groups listed here (a group silently lost to a dense fallback fails).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparselora_fx import backend
from sparselora_fx.counters import counters, record_selections
from sparselora_fx.models import TINY_ARCHITECTURES, build_tiny_model, tiny_batch

# arch -> (LoRA units matched, gated_mlp, mlp, attn_qk, attn_vo) for 2 layers, LoRA on every linear
EXPECTED: dict[str, tuple[int, int, int, int, int]] = {
    "llama": (14, 2, 0, 2, 2),
    "qwen2": (14, 2, 0, 2, 2),
    "qwen3": (14, 2, 0, 0, 2),  # q_norm/k_norm: Q/K dense, with the reason
    "mistral": (14, 2, 0, 2, 2),
    "gemma": (14, 2, 0, 2, 2),
    "gemma2": (14, 2, 0, 2, 2),  # eager attention with logit soft-capping
    "gpt_neox": (8, 0, 2, 2, 2),  # fused query_key_value, interleaved per head
    "opt": (12, 0, 2, 2, 2),
    "phi3": (8, 2, 0, 2, 2),  # fused gate_up_proj and qkv_proj
    "gpt2": (8, 0, 2, 2, 2),  # Conv1D weights [in, out], fused c_attn, gelu_new as a formula
    "bert": (13, 0, 2, 2, 2),  # + the pooler's dense, in no group
}

# Units that stay dense on purpose, with the words their reason must contain.
DENSE_REASONS: dict[str, dict[str, str]] = {
    "qwen3": {"model.layers.0.self_attn.q_proj": "per-head norm before RoPE",
              "model.layers.0.self_attn.k_proj": "per-head norm before RoPE"},
}


def test_every_tiny_architecture_has_a_row() -> None:
    assert set(EXPECTED) == set(TINY_ARCHITECTURES)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.detach().abs().max().item()
    diff = (a.detach() - b.detach()).abs().max().item()
    return diff / scale if scale else diff


def _step(fn, model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    logits = fn(input_ids=batch["input_ids"]).logits
    labels = batch["labels"]
    if logits.dim() == 2:
        loss = F.cross_entropy(logits, labels)
    else:
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_architecture_groups_and_sparsity_zero_match_dense(arch: str) -> None:
    batch = tiny_batch(arch)
    dense = build_tiny_model(arch, init_lora_b=True, dtype=torch.float64)
    loss_d, grads_d = _step(torch.compile(dense, backend="aot_eager"), dense, batch)

    model = build_tiny_model(arch, init_lora_b=True, dtype=torch.float64)
    backend.LAST_REPORTS.clear()
    with record_selections() as rec:
        fn = torch.compile(model, backend="sparselora", options={"sparsity": 0.0, "inner": "aot_eager"})
        loss_s, grads_s = _step(fn, model, batch)
    records = rec.picks

    (report,) = backend.LAST_REPORTS
    n_units, gated, mlp, qk, vo = EXPECTED[arch]
    counts = report.counts()
    assert report.graphs == 1
    assert sum(1 for u in report.units if "[" not in u.fqn) + len(
        {u.fqn.split("[")[0] for u in report.units if "[" in u.fqn}) == n_units
    got = tuple(counts.get(k, 0) for k in ("gated_mlp", "mlp", "attn_qk", "attn_vo"))
    assert got == (gated, mlp, qk, vo), (got, report.skipped)
    skipped = {s.name: s.reason for s in report.skipped}
    for name, words in DENSE_REASONS.get(arch, {}).items():
        assert words in skipped.get(name, ""), skipped
    assert records, "no sparselora selection op ran"
    for name, out in records:  # keep = N: every selection keeps every channel
        for idx in (out if isinstance(out, tuple) else (out,)):
            assert torch.equal(idx, torch.arange(idx.numel())), name

    assert _rel(loss_s, loss_d) < 1e-6
    worst = max((_rel(grads_s[n], grads_d[n]), n) for n in grads_d)
    assert worst[0] < 1e-6, worst
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


# ------------------------------------------- fused projections: the kept rows are the right rows

# arch -> (layers path, fused qkv, o, MLP down (its input is the intermediate), q/k/v fused row maps)
_H, _KV, _D = 4, 2, 16


def _contiguous(*offsets: int):
    return lambda part, idx: idx + offsets[part]


def _per_head(part: int, idx: torch.Tensor) -> torch.Tensor:  # GPT-NeoX: [q_h, k_h, v_h] per head
    return (idx // _D) * 3 * _D + part * _D + idx % _D


FUSED = {
    "phi3": ("base_model.model.model.layers", "self_attn.qkv_proj", "self_attn.o_proj", "mlp.down_proj",
             _contiguous(0, _H * _D, (_H + _KV) * _D)),
    "gpt2": ("base_model.model.transformer.h", "attn.c_attn", "attn.c_proj", "mlp.c_proj",
             _contiguous(0, _H * _D, 2 * _H * _D)),
    "gpt_neox": ("base_model.model.gpt_neox.layers", "attention.query_key_value", "attention.dense",
                 "mlp.dense_4h_to_h", _per_head),
}


def _mask(n: int, keep: torch.Tensor) -> torch.Tensor:
    m = torch.zeros(n, dtype=torch.float64)
    m[keep] = 1
    return m


@pytest.mark.parametrize("arch", sorted(FUSED))
def test_fused_projections_compute_the_selected_rows(arch: str) -> None:
    """At sparsity 0.5 the compiled step equals eager with the same kept sets applied by masking:
    the fused q/k/v rows (mapped here independently of the rewrite), o's and the MLP's kept inputs."""
    batch = tiny_batch(arch)
    model = build_tiny_model(arch, init_lora_b=True, dtype=torch.float64)
    with record_selections() as rec:
        fn = torch.compile(model, backend="sparselora", options={"sparsity": 0.5, "inner": "aot_eager"})
        loss_s, grads_s = _step(fn, model, batch)
    sets = {op: rec.of(op) for op in ("select_qk", "select_vo", "select_mlp")}
    assert all(len(v) == 2 for v in sets.values()), {k: len(v) for k, v in sets.items()}

    path, qkv_name, o_name, down_name, rows = FUSED[arch]
    ref = build_tiny_model(arch, init_lora_b=True, dtype=torch.float64)
    layers = ref.get_submodule(path)
    handles = []
    for i, layer in enumerate(layers):
        (idx_q, idx_k), (idx_v, idx_o), idx_mlp = sets["select_qk"][i], sets["select_vo"][i], sets["select_mlp"][i]
        assert idx_o.numel() < (_H * _D) and idx_mlp.numel() < 96, "sparsity 0.5 must drop channels"
        qkv, o, down = (layer.get_submodule(n) for n in (qkv_name, o_name, down_name))
        kept = torch.cat([rows(0, idx_q), rows(1, idx_k), rows(2, idx_v)])
        width = qkv.base_layer.weight.shape[1] if arch == "gpt2" else qkv.base_layer.weight.shape[0]
        m_qkv, m_o, m_mlp = _mask(width, kept), _mask(_H * _D, idx_o), _mask(96, idx_mlp)
        handles.append(qkv.base_layer.register_forward_hook(lambda mod, args, out, m=m_qkv: out * m))
        handles.append(o.base_layer.register_forward_pre_hook(lambda mod, args, m=m_o: (args[0] * m,)))
        handles.append(down.register_forward_pre_hook(lambda mod, args, m=m_mlp: (args[0] * m,)))
    try:
        loss_r, grads_r = _step(ref, ref, batch)
    finally:
        for h in handles:
            h.remove()
    assert _rel(loss_s, loss_r) < 1e-9
    worst = max((_rel(grads_s[n], grads_r[n]), n) for n in grads_r)
    assert worst[0] < 1e-9, worst


def test_policy_rules_naming_a_fused_module_cover_its_parts() -> None:
    """A rule for the module a user sees (``*.qkv_proj``) or a part's name copied from the report
    (``qkv_proj[v]``) sets the groups its parts are in; no "matches no module" warning."""
    from sparselora_fx import explain
    from sparselora_fx.policy import Policy, Rule

    policy = Policy(mlp=0.5, attn_qk=0.5, attn_vo=0.5, rules=(
        Rule(match=("*.qkv_proj",), attn_qk=0.875),
        Rule(match=("*.gate_up_proj",), mlp=0.25),
        Rule(match=("model.layers.1.self_attn.qkv_proj[v]",), attn_vo=0.75),
    ))
    model = build_tiny_model("phi3")
    report = explain(model, input_ids=tiny_batch("phi3")["input_ids"], options={"policy": policy})
    got = {(g.name, g.kind): g.sparsity for g in report.groups}
    for i in (0, 1):
        assert got[(f"model.layers.{i}.self_attn", "attn_qk")] == 0.875, got
        assert got[(f"model.layers.{i}.mlp", "gated_mlp")] == 0.25, got
    assert got[("model.layers.0.self_attn", "attn_vo")] == 0.5, got
    assert got[("model.layers.1.self_attn", "attn_vo")] == 0.75, got
    assert not [n for n in report.notes if "matches no module" in n], report.notes


# ---------------------------------------- SVD factors: built at compile time, on the tensors the ops read


def _svd_everywhere_step(arch: str, steps: int, on_step=None):
    from sparselora_fx.policy import Policy

    policy = Policy(mlp=0.5, attn_qk=0.5, attn_vo=0.5, estimator={"kind": "svd", "rank": 4})
    model = build_tiny_model(arch, init_lora_b=True)
    fn = torch.compile(model, backend="sparselora", options={"policy": policy, "inner": "aot_eager"})
    batch = tiny_batch(arch)
    for i in range(steps):
        if on_step is not None:
            on_step(i)
        _step(fn, model, batch)


@pytest.mark.parametrize("arch", sorted(FUSED))
def test_svd_factors_of_fused_parts_and_conv1d_are_prepared_at_compile_time(arch: str, monkeypatch) -> None:
    """Every factor the first step uses was built by the prepare pass (Conv1D's ``W.t()``, a fused
    part's rows), so no SVD runs inside a training step."""
    from sparselora_fx import factor_cache as fc

    monkeypatch.setenv("SPARSELORA_DISK_CACHE", "0")
    fc.clear_cache()
    counters.clear()
    _svd_everywhere_step(arch, 1)
    prepared = counters["sparselora"]["factors_prepared"]
    # q, k, v and the MLP's fc1 (Phi-3: gate and up), each fused part its own weight, x 2 layers
    assert prepared == (10 if arch == "phi3" else 8)
    assert fc.cache_stats().misses == prepared == counters["sparselora"]["factor_cache_misses"]


@pytest.mark.parametrize("arch", ["gpt2", "phi3", "gpt_neox"])
def test_fingerprints_are_not_recomputed_in_later_steps(arch: str, monkeypatch) -> None:
    """From the second step on no weight is hashed again. The graph holds its factors as inputs
    (``bound_factors``), so this holds for GPT-NeoX's per-head parts too (unflatten -> slice ->
    flatten: a fresh copy each step, which the run-time lookup would hash per layer per step)."""
    from sparselora_fx import factor_cache as fc

    monkeypatch.setenv("SPARSELORA_DISK_CACHE", "0")
    fc.clear_cache()
    counters.clear()
    hashed: list[int] = []  # fingerprints computed before each step (the last entry: all three)
    count = counters["sparselora"]
    _svd_everywhere_step(arch, 3, on_step=lambda i: hashed.append(count["fingerprints_computed"]))
    hashed.append(count["fingerprints_computed"])
    assert hashed[1] > 0 and hashed[1] == hashed[2] == hashed[3], hashed  # none after the first step
    assert count["factor_lookups"] == 0  # not even a memo lookup: the factors are graph inputs
