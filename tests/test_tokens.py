"""tokens = "output_dense": output tokens run dense, context tokens sparse, no recompile per batch.

The exactness checks compare the compiled float64 run with an eager float64 reference written
here: forward hooks on the PEFT base layers that compute every token densely and then drop, for
the sparse tokens only, the channels the compiled run kept out (kept sets captured from the
selection ops). The dense token set of the reference is derived here from the labels.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparselora_fx import backend
from sparselora_fx.errors import PolicyError
from sparselora_fx.models import build_tiny_model, tiny_batch
from sparselora_fx.passes import tokens
from sparselora_fx.policy import Policy
from sparselora_fx.counters import SelectionRecorder, record_selections

S = 0.5
IGNORE = -100


def _policy(mode: str = "output_dense", dense_tokens: float | int = 0.25) -> Policy:
    return Policy(mlp=S, attn_qk=S, attn_vo=S, tokens=mode, dense_tokens=dense_tokens)


def _compile(model, policy: Policy):
    return torch.compile(model, backend="sparselora", options={"policy": policy, "inner": "aot_eager"})


def _loss64(logits, labels, vocab_size, **kwargs):
    """The causal-LM loss in the model's dtype (HF's upcasts to float32), shifting by slicing."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, vocab_size), labels[:, 1:].reshape(-1), ignore_index=IGNORE)


def _rms_norm_in_input_dtype(self, hidden_states):
    var = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(var + self.variance_epsilon))


@pytest.fixture
def float64_llama(monkeypatch):
    from transformers.models.llama import modeling_llama

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", _rms_norm_in_input_dtype)

    def build(layers: int = 2, loss=_loss64):
        model = build_tiny_model("llama", num_layers=layers, init_lora_b=True, dtype=torch.float64)
        if loss is not None:
            model.base_model.model.loss_function = loss
        return model

    return build


def _labels(ids: torch.Tensor, context: list[int]) -> torch.Tensor:
    """Labels with the first ``context[b]`` positions of row b ignored (a prompt)."""
    labels = ids.clone()
    for b, c in enumerate(context):
        labels[b, :c] = IGNORE
    return labels


def _dense_rows(labels: torch.Tensor, budget: int) -> torch.Tensor:
    """The spec, written out: output tokens (labels[t+1] kept) first, then context, in token order."""
    B, T = labels.shape
    out = [(b, t) for b in range(B) for t in range(T) if t + 1 < T and labels[b, t + 1] != IGNORE]
    ctx = [(b, t) for b in range(B) for t in range(T) if (b, t) not in out]
    rows = torch.zeros(B, T, dtype=torch.bool)
    for b, t in (out + ctx)[:budget]:
        rows[b, t] = True
    return rows


def _trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _step(fn, batch):
    model = getattr(fn, "_orig_mod", fn)
    model.zero_grad(set_to_none=True)
    loss = fn(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in _trainable(model).items()}


def _rel(a, b) -> float:
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale or 1.0)


class SplitReference:
    """Eager hooks: tokens in ``dense_rows`` compute every channel; the others only the kept ones."""

    def __init__(self, model, kept: dict[tuple[int, str], tuple[torch.Tensor, ...]], dense_rows: torch.Tensor):
        self.kept, self.dense = kept, dense_rows
        self.handles = []
        for i, layer in enumerate(model.base_model.model.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            self._out(attn.q_proj.base_layer, (i, "qk"), 0)
            self._out(attn.k_proj.base_layer, (i, "qk"), 1)
            self._out(attn.v_proj.base_layer, (i, "vo"), 0)
            self._in(attn.o_proj.base_layer, (i, "vo"), 1)
            # down's base AND LoRA read only the kept intermediate channels for sparse tokens
            self._in(mlp.down_proj, (i, "mlp"), 0)

    def _mask(self, t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        cols = torch.zeros(t.shape[-1], dtype=t.dtype)
        cols[idx] = 1
        return torch.where(self.dense[..., None], t, t * cols)

    def _out(self, mod, key, which):
        self.handles.append(mod.register_forward_hook(lambda m, a, out: self._mask(out, self.kept[key][which])))

    def _in(self, mod, key, which):
        self.handles.append(mod.register_forward_pre_hook(
            lambda m, a: (self._mask(a[0], self.kept[key][which]), *a[1:])))

    def remove(self):
        for h in self.handles:
            h.remove()


def _kept(rec: SelectionRecorder, layers: int) -> dict:
    kept = {}
    for op, kind in (("select_qk", "qk"), ("select_vo", "vo"), ("select_mlp", "mlp")):
        got = rec.of(op)
        assert len(got) == layers, (op, len(got))
        for i, out in enumerate(got):
            kept[(i, kind)] = out if isinstance(out, tuple) else (out,)
    return kept


def _reference(build, batch, kept, dense_rows):
    ref = build()
    hooks = SplitReference(ref, kept, dense_rows)
    try:
        return _step(ref, batch)
    finally:
        hooks.remove()


# ------------------------------------------------------------------------------- 1. the split op


def test_split_tokens_orders_output_then_context_then_padding_and_counts_overflow():
    gen = torch.Generator().manual_seed(3)
    out = torch.rand(3, 7, generator=gen) < 0.4
    valid = torch.ones(3, 7, dtype=torch.long)
    valid[2, 4:] = 0  # right padding
    out[2, 5] = True  # a marked padding token is still padding
    tokens.reset_token_stats()
    for budget, want_d in ((0.25, 21 // 4), (8, 8), (100, 21)):
        b = tokens.Budget.from_policy(budget)
        dense, sparse = torch.ops.sparselora.split_tokens(out, valid, b.num, b.den, b.fixed)
        flat_out, flat_ok = out.reshape(-1).tolist(), valid.reshape(-1).bool().tolist()
        prio = [0 if (o and v) else 1 if v else 2 for o, v in zip(flat_out, flat_ok)]
        order = sorted(range(21), key=lambda i: (prio[i], i))
        assert dense.tolist() == sorted(order[:want_d])
        assert sparse.tolist() == sorted(order[want_d:])
    n_out = sum(o and v for o, v in zip(flat_out, flat_ok))
    stats = tokens.token_stats()
    assert stats.calls == 3 and stats.output_tokens == 3 * n_out
    assert stats.overflow_tokens == max(0, n_out - 21 // 4) + max(0, n_out - 8)


# ------------------------------------------- 2. exact against a split reference; no recompile


def test_output_tokens_dense_matches_reference_and_new_counts_do_not_recompile(float64_llama):
    ids = tiny_batch("llama")["input_ids"]  # 2 x 12: N = 24 tokens, D = 6
    first = {"input_ids": ids, "labels": _labels(ids, [9, 10])}  # 3 + 2 = 5 output tokens
    second = {"input_ids": ids, "labels": _labels(ids, [4, 6])}  # 8 + 6 = 14 output tokens: overflow 8
    model = float64_llama()
    f = _compile(model, _policy())
    tokens.reset_token_stats()
    for i, batch in enumerate((first, second)):
        with record_selections() as rec, torch._dynamo.config.patch(error_on_recompile=i > 0):
            loss_c, grads_c = _step(f, batch)
        kept = _kept(rec, 2)
        rows = _dense_rows(batch["labels"], 6)
        loss_r, grads_r = _reference(float64_llama, batch, kept, rows)
        assert _rel(loss_c, loss_r) < 1e-10, i
        worst = max(_rel(grads_c[n], grads_r[n]) for n in grads_r)
        assert worst < 1e-9, (i, worst)
        # the test can fail: all tokens sparse with the same kept sets is a different run
        loss_s, _ = _reference(float64_llama, batch, kept, torch.zeros_like(rows))
        assert _rel(loss_c, loss_s) > 1e-6
    assert tokens.token_stats() == (2, 5 + 14, 8)
    report = backend.LAST_REPORTS[-1]
    assert not [s for s in report.skipped if s.name == "tokens"]


# ----------------------------------------------------------------------- 3. all_sparse unchanged


def test_all_sparse_mode_runs_every_token_sparse(float64_llama):
    ids = tiny_batch("llama")["input_ids"]
    batch = {"input_ids": ids, "labels": _labels(ids, [9, 10])}
    model = float64_llama(layers=1)
    tokens.reset_token_stats()
    with record_selections() as rec:
        loss_c, grads_c = _step(_compile(model, _policy("all_sparse")), batch)
    assert tokens.token_stats().calls == 0
    loss_r, grads_r = _reference(lambda: float64_llama(layers=1), batch, _kept(rec, 1),
                                 torch.zeros(ids.shape, dtype=torch.bool))
    assert _rel(loss_c, loss_r) < 1e-10
    assert max(_rel(grads_c[n], grads_r[n]) for n in grads_r) < 1e-9


# ---------------------------------------------------------- 4. where the output tokens come from


def test_hf_loss_labels_are_found_through_its_pad_shift(float64_llama):
    ids = tiny_batch("llama")["input_ids"]
    labels = _labels(ids, [7, 11])  # HF shifts by padding: 5 + 1 output tokens (the last has none)
    model = float64_llama(layers=1, loss=None)  # transformers' own ForCausalLMLoss
    tokens.reset_token_stats()
    _compile(model, _policy())(input_ids=ids, labels=labels).loss.backward()
    assert tokens.token_stats() == (1, 6, 0)


def test_without_labels_every_token_is_sparse_and_the_report_says_why(float64_llama):
    model = float64_llama(layers=1)
    tokens.reset_token_stats()
    with record_selections() as rec:
        _compile(model, _policy())(input_ids=tiny_batch("llama")["input_ids"]).logits.sum().backward()
    assert rec.picks and tokens.token_stats().calls == 0
    why = [s.reason for s in backend.LAST_REPORTS[-1].skipped if s.name == "tokens"]
    assert len(why) == 1 and "no cross_entropy" in why[0] and "mark_output_tokens" in why[0]


def test_explicit_marker_gives_the_output_tokens(float64_llama):
    model = float64_llama(layers=1)
    ids = tiny_batch("llama")["input_ids"]
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    mask[0, 3:5] = True
    mask[1, 9] = True

    def step(input_ids, out_mask):
        tokens.mark_output_tokens(out_mask)
        return model(input_ids=input_ids).logits

    tokens.reset_token_stats()
    f = torch.compile(step, backend="sparselora", options={"policy": _policy(dense_tokens=2), "inner": "aot_eager"})
    f(ids, mask).sum().backward()
    assert tokens.token_stats() == (1, 3, 1)
    step(ids, mask)  # outside the compiler the marker is a no-op


# ------------------------------------------------------------------------------ 5. the policy knob


def test_dense_tokens_policy_knob_validates_and_round_trips():
    for value in (0.25, 0.5, 1.0, 16):
        p = Policy(tokens="output_dense", dense_tokens=value)
        assert Policy.from_toml_text(p.dump()) == p and Policy.from_dict(p.to_dict()).dense_tokens == value
    for bad in (0.0, 1.5, 0, -3, "half", True):
        with pytest.raises(PolicyError, match="dense_tokens"):
            Policy(dense_tokens=bad)
    assert tokens.Budget.from_policy(0.25).dense(24) == 6 and tokens.Budget.from_policy(8).dense(5) == 5


# ------------------------------------- 6. Conv1D (GPT-2) and fused projections split their tokens too

_H, _D = 4, 16


def _contiguous(*offsets: int):
    return lambda part, idx: idx + offsets[part]


def _per_head(part: int, idx: torch.Tensor) -> torch.Tensor:  # GPT-NeoX: [q_h, k_h, v_h] per head
    return (idx // _D) * 3 * _D + part * _D + idx % _D


# arch -> (layers, fused qkv, o, MLP down, part channel -> fused row); phi3: GQA 4/2 heads, fused gate_up
FUSED_ARCHS = {
    "gpt2": ("base_model.model.transformer.h", "attn.c_attn", "attn.c_proj", "mlp.c_proj",
             _contiguous(0, _H * _D, 2 * _H * _D)),
    "phi3": ("base_model.model.model.layers", "self_attn.qkv_proj", "self_attn.o_proj", "mlp.down_proj",
             _contiguous(0, _H * _D, (_H + 2) * _D)),
    "gpt_neox": ("base_model.model.gpt_neox.layers", "attention.query_key_value", "attention.dense",
                 "mlp.dense_4h_to_h", _per_head),
}


class FusedSplitReference(SplitReference):
    """``SplitReference`` for a fused q/k/v projection: its kept fused rows, o's and down's kept inputs."""

    def __init__(self, model, arch: str, kept: dict, dense_rows: torch.Tensor):
        self.kept, self.dense = kept, dense_rows
        self.handles = []
        path, qkv, o, down, rows = FUSED_ARCHS[arch]
        for i, layer in enumerate(model.get_submodule(path)):
            (idx_q, idx_k), (idx_v, _) = kept[(i, "qk")], kept[(i, "vo")]
            self.kept[(i, "qkv")] = (torch.cat([rows(0, idx_q), rows(1, idx_k), rows(2, idx_v)]),)
            self._out(layer.get_submodule(qkv).base_layer, (i, "qkv"), 0)
            self._in(layer.get_submodule(o).base_layer, (i, "vo"), 1)
            self._in(layer.get_submodule(down), (i, "mlp"), 0)


@pytest.mark.parametrize("arch", sorted(FUSED_ARCHS))
def test_conv1d_and_fused_projections_split_tokens_exactly(arch, monkeypatch):
    from transformers.models.phi3 import modeling_phi3

    monkeypatch.setattr(modeling_phi3.Phi3RMSNorm, "forward", _rms_norm_in_input_dtype)

    def build():
        model = build_tiny_model(arch, init_lora_b=True, dtype=torch.float64)
        model.base_model.model.loss_function = _loss64
        return model

    ids = tiny_batch(arch)["input_ids"]
    batch = {"input_ids": ids, "labels": _labels(ids, [9, 10])}
    tokens.reset_token_stats()
    backend.LAST_REPORTS.clear()
    with record_selections() as rec:
        loss_c, grads_c = _step(_compile(build(), _policy()), batch)
    (report,) = backend.LAST_REPORTS
    assert report.skipped == [] and len(report.groups) == 6, report.skipped  # nothing fell back to dense
    assert tokens.token_stats() == (1, 5, 0)
    kept, rows = _kept(rec, 2), _dense_rows(batch["labels"], 6)

    def reference(dense_rows):
        ref = build()
        hooks = FusedSplitReference(ref, arch, dict(kept), dense_rows)
        try:
            return _step(ref, batch)
        finally:
            hooks.remove()

    loss_r, grads_r = reference(rows)
    assert _rel(loss_c, loss_r) < 1e-10
    assert max(_rel(grads_c[n], grads_r[n]) for n in grads_r) < 1e-9
    loss_s, _ = reference(torch.zeros_like(rows))  # the dense tokens did run dense
    assert _rel(loss_c, loss_s) > 1e-6
