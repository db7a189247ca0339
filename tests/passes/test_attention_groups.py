"""Attention grouping on Dynamo graphs: tiny HF models and hand-written attention modules.

Graphs come from Dynamo only (a backend that runs the analysis and returns ``gm.forward``): no
AOT, no Inductor. What the pass reads off the graph (head layout, RoPE channel pairs, GQA head
sharing) is checked against float64 eager runs of the same computation, not against constants.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparselora_fx.models import build_tiny_model, tiny_batch
from sparselora_fx.passes import graph_ops as ops
from tests.conftest import analysis_model
from sparselora_fx.passes.analyse.attention import FUSED_REASON, find_attention_groups
from sparselora_fx.passes.analyse.groups import Group, Skipped
from sparselora_fx.passes.weights import oriented_weight
from sparselora_fx.passes.analyse.units import LoraUnit, find_lora_units


@dataclass
class Traced:
    gm: torch.fx.GraphModule
    units: list[LoraUnit]
    groups: list[Group]
    skipped: list[Skipped]

    def kind(self, kind: str) -> list[Group]:
        return [g for g in self.groups if g.kind == kind]

    def skipped_for(self, name: str) -> list[Skipped]:
        return [s for s in self.skipped if s.name == name]


def trace(module: nn.Module, *args: Any, dynamic: bool | None = None, **kwargs: Any) -> Traced:
    """Dynamo-trace ``module`` once (one full graph) and run the attention grouping on it."""
    seen: list[Traced] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        units = find_lora_units(gm)
        groups, skipped = find_attention_groups(units)
        seen.append(Traced(gm, units, groups, skipped))
        return gm.forward

    torch._dynamo.reset()
    try:
        torch.compile(module, backend=backend, fullgraph=True, dynamic=dynamic)(*args, **kwargs)
    finally:
        torch._dynamo.reset()
    assert len(seen) == 1
    return seen[0]


def trace_hf(arch: str, impl: str = "sdpa", mask: bool = False) -> Traced:
    """One Dynamo trace per (arch, impl, mask) for the whole file (forward only, no loss)."""
    return _trace_hf(arch, impl, mask)


@functools.lru_cache(maxsize=None)
def _trace_hf(arch: str, impl: str, mask: bool) -> Traced:
    model = analysis_model(arch, num_layers=2, attn_implementation=impl)
    batch = {"input_ids": tiny_batch(arch)["input_ids"]}
    if mask:
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        batch["attention_mask"][0, :3] = 0
    return trace(model, **batch)


# --- tiny HF models --------------------------------------------------------------------------------

GQA_ROPE = dict(num_heads=4, num_kv_heads=2, head_dim=16, rope="half", rotary_dim=16)
MHA_NO_ROPE = dict(num_heads=4, num_kv_heads=4, head_dim=16, rope="none", rotary_dim=0)
LLAMA_NAMES = ("model.layers.{}.self_attn", "model.layers.{}.self_attn")
# (arch, attn_implementation, with a padding mask) -> (qk group name, vo group name), layout.
# The mask is passed to one SDPA and one eager trace each so that every trace is reused.
HF_CASES = {
    ("llama", "sdpa", False): (LLAMA_NAMES, GQA_ROPE),
    ("llama", "eager", True): (LLAMA_NAMES, GQA_ROPE),
    ("qwen2", "sdpa", False): (LLAMA_NAMES, GQA_ROPE),
    ("mistral", "sdpa", False): (LLAMA_NAMES, GQA_ROPE),
    ("gemma", "sdpa", False): (LLAMA_NAMES, GQA_ROPE),
    ("opt", "sdpa", False): (("model.decoder.layers.{}.self_attn",) * 2, MHA_NO_ROPE),
    ("bert", "sdpa", True): (("bert.encoder.layer.{}.attention.self", "bert.encoder.layer.{}.attention"),
                             MHA_NO_ROPE),
    ("bert", "eager", False): (("bert.encoder.layer.{}.attention.self", "bert.encoder.layer.{}.attention"),
                               MHA_NO_ROPE),
}


def _is_attention_op(node: torch.fx.Node, impl: str) -> bool:
    if impl == "sdpa":
        return ops.is_call(node, ops.SDPA_FNS)
    return ops.is_call(node, ops.MATMUL_FNS, ops.MATMUL_METHODS)


@pytest.mark.parametrize("arch,impl,mask", list(HF_CASES))
def test_hf_attention_groups(arch: str, impl: str, mask: bool) -> None:
    t = trace_hf(arch, impl, mask)
    (qk_name, vo_name), layout = HF_CASES[(arch, impl, mask)]
    qk, vo = t.kind("attn_qk"), t.kind("attn_vo")
    assert len(qk) == 2 and len(vo) == 2 and len(t.groups) == 4
    assert [g.name for g in qk] == [qk_name.format(i) for i in range(2)]
    assert [g.name for g in vo] == [vo_name.format(i) for i in range(2)]
    for g in qk:
        assert [u.role for u in g.units] == ["q", "k"]
        assert (g.num_heads, g.num_kv_heads, g.head_dim, g.rope, g.rotary_dim) == tuple(layout.values())
        assert g.channels == layout["head_dim"]
    for g in vo:
        assert [u.role for u in g.units] == ["v", "o"]
        assert (g.num_heads, g.num_kv_heads, g.head_dim) == tuple(list(layout.values())[:3])
        assert g.rope == "none" and g.rotary_dim == 0
        assert g.units[0].out_features == g.num_kv_heads * g.head_dim
        assert g.units[1].in_features == g.num_heads * g.head_dim
    for a, b in zip(qk, vo):
        assert a.attention_node is b.attention_node and _is_attention_op(a.attention_node, impl)
    # a padding mask is reported only when the model was given one, as that input placeholder
    placeholders = [n for n in t.gm.graph.nodes if n.op == "placeholder" and "attention_mask" in n.name]
    assert len(placeholders) == int(mask)
    assert all(g.mask is (placeholders[0] if mask else None) for g in t.groups)
    assert not t.skipped


# arch -> fused qkv name, o name, (offset, block, period) of the q, k, v parts in the fused output rows
FUSED_LAYOUTS = {
    "gpt_neox": ("gpt_neox.layers.{}.attention.query_key_value", "gpt_neox.layers.{}.attention.dense",
                 [(0, 16, 48), (16, 16, 48), (32, 16, 48)]),  # per head [q_h, k_h, v_h]
    "phi3": ("model.layers.{}.self_attn.qkv_proj", "model.layers.{}.self_attn.o_proj",
             [(0, 64, 128), (64, 32, 128), (96, 32, 128)]),  # [q | k | v], GQA 4/2 heads
    "gpt2": ("transformer.h.{}.attn.c_attn", "transformer.h.{}.attn.c_proj",
             [(0, 64, 192), (64, 64, 192), (128, 64, 192)]),  # Conv1D, split(64, dim=2)
}


@pytest.mark.parametrize("arch", sorted(FUSED_LAYOUTS))
def test_hf_fused_qkv_is_grouped_by_parts(arch: str) -> None:
    qkv, out, layout = FUSED_LAYOUTS[arch]
    t = trace_hf(arch)
    assert len(t.kind("attn_qk")) == 2 and len(t.kind("attn_vo")) == 2, t.skipped
    assert not t.skipped
    for i, (qk, vo) in enumerate(zip(t.kind("attn_qk"), t.kind("attn_vo"))):
        q, k = qk.units
        v, o = vo.units
        assert o.fqn == out.format(i) and o.part is None
        for unit, (offset, block, period) in zip((q, k, v), layout):
            assert unit.part is not None and unit.part.parent.fqn == qkv.format(i)
            assert (unit.part.offset, unit.part.block, unit.part.period) == (offset, block, period)
        assert q.part.parent is k.part.parent is v.part.parent
        rows = sorted(r for u in (q, k, v) for r in u.part.rows())
        assert rows == list(range(q.part.parent.out_features)), "the parts tile the fused output"
        # the weight the sparse ops (and the compile-time SVD factors) get for a part is its rows
        w = torch.randn(ops.example_value(q.weight).shape)
        w_out = w.t() if q.base.weight_transposed else w
        for unit in (q, k, v):
            assert torch.equal(oriented_weight(unit, w), w_out[unit.part.rows()])
            if unit.base.bias is not None:  # a part's bias is its rows of the fused bias, never the whole
                with pytest.raises(AssertionError, match="a part's bias"):
                    unit.bias


def test_hf_llama_gqa_head_map_matches_float64_run() -> None:
    """Kv head j must feed exactly attention heads j*g .. j*g+g-1 (g = H / Hkv), as the group says."""
    g = trace_hf("llama").kind("attn_vo")[0]
    model = build_tiny_model("llama", num_layers=2, dtype=torch.float64)
    attn = model.get_base_model().get_submodule(g.name)
    changed = _heads_changed_by_kv_head(model, attn.v_proj, attn.o_proj, tiny_batch("llama"),
                                        g.num_kv_heads, g.num_heads, g.head_dim)
    group = g.num_heads // g.num_kv_heads
    assert changed == {j: set(range(j * group, (j + 1) * group)) for j in range(g.num_kv_heads)}


def _heads_changed_by_kv_head(model: nn.Module, v_proj: nn.Module, o_proj: nn.Module, inputs: dict[str, Any],
                              kv_heads: int, heads: int, head_dim: int) -> dict[int, set[int]]:
    """Perturb v's output one kv head at a time and see which heads of o's input move (float64)."""
    captured: list[torch.Tensor] = []
    bump: list[int] = []

    def on_v(_m: nn.Module, _a: Any, out: torch.Tensor) -> torch.Tensor:
        if not bump:
            return out
        out = out.clone()
        out[..., bump[0] * head_dim:(bump[0] + 1) * head_dim] += 1.0
        return out

    def on_o(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        captured.append(args[0].detach().clone())

    handles = [v_proj.register_forward_hook(on_v), o_proj.register_forward_pre_hook(on_o)]
    try:
        with torch.no_grad():
            model(**inputs)
            base = captured.pop()
            result: dict[int, set[int]] = {}
            for j in range(kv_heads):
                bump[:] = [j]
                model(**inputs)
                delta = (captured.pop() - base).abs().reshape(*base.shape[:-1], heads, head_dim)
                result[j] = {h for h in range(heads) if delta[..., h, :].max() > 1e-9}
    finally:
        for h in handles:
            h.remove()
    return result


# --- hand-written attention modules ---------------------------------------------------------------

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, SEQ, BATCH = 32, 4, 2, 8, 6, 2


class LoraLinear(nn.Module):
    """A frozen weight plus a LoRA branch, spelled with ``F.linear`` or ``x @ W.T``."""

    def __init__(self, d_in: int, d_out: int, spelling: str, rank: int = 2):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / math.sqrt(d_in), requires_grad=False)
        self.lora_A = nn.Parameter(torch.randn(rank, d_in) * 0.1)
        self.lora_B = nn.Parameter(torch.randn(d_out, rank) * 0.1)
        self.spelling = spelling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spelling == "linear":
            return F.linear(x, self.weight) + 0.5 * F.linear(F.linear(x, self.lora_A), self.lora_B)
        return x @ self.weight.T + (x @ self.lora_A.T) @ self.lora_B.T * 0.5


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rotate_interleaved(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope: str, rotary_dim: int) -> torch.Tensor:
    """The module's RoPE (``x`` is [B, H, T, D]); the reference the detected pairs are checked on."""
    if rope == "none":
        return x
    rotate = rotate_interleaved if rope == "interleaved" else rotate_half
    if rotary_dim < x.shape[-1]:
        x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
        return torch.cat([x_rot * cos + rotate(x_rot) * sin, x_pass], dim=-1)
    return x * cos + rotate(x) * sin


def rope_tables(rope: str, rotary_dim: int, seq: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    if rope == "none":
        rotary_dim = 2
    inv = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    freqs = torch.outer(torch.arange(seq, dtype=torch.float64), inv)
    emb = freqs.repeat_interleave(2, -1) if rope == "interleaved" else torch.cat((freqs, freqs), -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    b, h, t, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n, t, d).reshape(b, h * n, t, d)


class TinyAttention(nn.Module):
    def __init__(self, rope: str = "half", rotary_dim: int = HEAD_DIM, gqa: str = "enable_gqa",
                 impl: str = "sdpa", spelling: str = "linear", fused: bool | str = False, q_op: str = "",
                 leak_q: bool = False, q_scale: bool = False, v_op: str = ""):
        super().__init__()
        self.scaling = HEAD_DIM ** -0.5 if q_scale else None
        self.kv_heads = HEADS if gqa == "none" else KV_HEADS
        self.rope, self.rotary_dim, self.gqa, self.impl = rope, rotary_dim, gqa, impl
        self.fused, self.q_op, self.leak_q, self.v_op = fused, q_op, leak_q, v_op
        q_w, kv_w = HEADS * HEAD_DIM, self.kv_heads * HEAD_DIM
        if fused:
            self.qkv_proj = LoraLinear(HIDDEN, q_w + 2 * kv_w, spelling)
        else:
            self.q_proj = LoraLinear(HIDDEN, q_w, spelling)
            self.k_proj = LoraLinear(HIDDEN, kv_w, spelling)
            self.v_proj = LoraLinear(HIDDEN, kv_w, spelling)
        self.o_proj = LoraLinear(q_w, HIDDEN, spelling)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attention_mask: torch.Tensor | None = None, memory: torch.Tensor | None = None) -> Any:
        b, t, _ = x.shape
        src = x if memory is None else memory
        s = src.shape[1]
        leaked = None
        if self.fused == "unbind":  # equal widths only: q/k/v as a stack, not a last-dim split
            q, k, v = self.qkv_proj(x).unflatten(-1, (3, -1)).unbind(-2)
        elif self.fused:
            qkv = self.qkv_proj(x)
            q, k, v = qkv.split([HEADS * HEAD_DIM, self.kv_heads * HEAD_DIM, self.kv_heads * HEAD_DIM], dim=-1)
            leaked = qkv.sum() if self.fused == "leak" else None
        else:
            q, k, v = self.q_proj(x), self.k_proj(src), self.v_proj(src)
        if self.scaling is not None:  # OPT-style: scale q before the head view
            q = q * self.scaling
        q = q.view(b, t, -1, HEAD_DIM).transpose(1, 2)
        k = k.view(b, s, -1, HEAD_DIM).transpose(1, 2)
        v = v.view(b, s, -1, HEAD_DIM).transpose(1, 2)
        if self.q_op == "sin":
            q = torch.sin(q)
        if self.v_op == "sin":
            v = torch.sin(v)
        leaked = q * 2.0 if self.leak_q else leaked
        q = apply_rope(q, cos[:t], sin[:t], self.rope, self.rotary_dim)
        k = apply_rope(k, cos[:s], sin[:s], self.rope, self.rotary_dim)
        mask = None
        if attention_mask is not None:
            mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -1e9
        n_rep = HEADS // self.kv_heads
        if self.gqa == "repeat_kv" or (self.impl == "eager" and n_rep > 1):
            k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        if self.impl == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.gqa == "enable_gqa")
        else:
            scores = torch.matmul(q, k.transpose(-1, -2)) * HEAD_DIM ** -0.5
            if mask is not None:
                scores = scores + mask
            probs = F.dropout(torch.softmax(scores, dim=-1), p=0.0, training=self.training)
            out = torch.matmul(probs, v)
        out = out.transpose(1, 2).reshape(b, t, HEADS * HEAD_DIM)
        y = self.o_proj(out)
        return (y, leaked) if leaked is not None else y


class Block(nn.Module):
    def __init__(self, checkpoint: bool = False, **kwargs: Any):
        super().__init__()
        self.attn = TinyAttention(**kwargs)
        self.checkpoint = checkpoint

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.checkpoint:
            return torch.utils.checkpoint.checkpoint(self.attn, *args, use_reentrant=False, **kwargs)
        return self.attn(*args, **kwargs)


def trace_block(seed: int = 0, mask: bool = False, memory_len: int = 0, dynamic: bool | None = None,
                batch: int = BATCH, seq: int = SEQ, **kwargs: Any) -> Traced:
    torch.manual_seed(seed)
    block = Block(**kwargs)
    x = torch.randn(batch, seq, HIDDEN)
    cos, sin = rope_tables(block.attn.rope, block.attn.rotary_dim, max(seq, memory_len))
    extra: dict[str, Any] = {}
    if mask:
        extra["attention_mask"] = torch.ones(batch, memory_len or seq)
    if memory_len:
        extra["memory"] = torch.randn(batch, memory_len, HIDDEN)
    return trace(block, x, cos, sin, dynamic=dynamic, **extra)


def rope_pairs(rope: str, rotary_dim: int, head_dim: int) -> dict[int, set[int]]:
    """The head-dim channels each channel is mixed with, as the group's (rope, rotary_dim) implies."""
    pairs = {c: {c} for c in range(head_dim)}
    for c in range(rotary_dim):
        if rope == "half":
            pairs[c].add((c + rotary_dim // 2) % rotary_dim)
        elif rope == "interleaved":
            pairs[c].add(c ^ 1)
    return pairs


def measured_pairs(rope: str, rotary_dim: int) -> dict[int, set[int]]:
    """Which output channels of the module's RoPE move when one input channel moves (float64)."""
    torch.manual_seed(1)
    cos, sin = rope_tables(rope, rotary_dim, SEQ, torch.float64)
    x = torch.randn(1, 1, SEQ, HEAD_DIM, dtype=torch.float64)
    base = apply_rope(x, cos, sin, rope, rotary_dim)
    out: dict[int, set[int]] = {}
    for c in range(HEAD_DIM):
        bumped = x.clone()
        bumped[..., c] += 1.0
        delta = (apply_rope(bumped, cos, sin, rope, rotary_dim) - base).abs().amax(dim=(0, 1, 2))
        out[c] = {d for d in range(HEAD_DIM) if delta[d] > 1e-9}
    return out


@pytest.mark.parametrize("rope,rotary_dim,gqa,impl,spelling", [
    ("half", HEAD_DIM, "enable_gqa", "sdpa", "linear"),
    ("interleaved", HEAD_DIM, "repeat_kv", "sdpa", "matmul"),
    ("half", HEAD_DIM // 2, "enable_gqa", "sdpa", "matmul"),
    ("interleaved", HEAD_DIM // 2, "repeat_kv", "eager", "linear"),
    ("none", 0, "none", "eager", "matmul"),
])
def test_hand_written_layouts(rope: str, rotary_dim: int, gqa: str, impl: str, spelling: str) -> None:
    t = trace_block(rope=rope, rotary_dim=rotary_dim, gqa=gqa, impl=impl, spelling=spelling)
    assert not t.skipped
    (qk,), (vo,) = t.kind("attn_qk"), t.kind("attn_vo")
    kv = HEADS if gqa == "none" else KV_HEADS
    assert [u.fqn for u in qk.units] == ["attn.q_proj", "attn.k_proj"] and qk.name == "attn"
    assert [u.fqn for u in vo.units] == ["attn.v_proj", "attn.o_proj"]
    assert (qk.num_heads, qk.num_kv_heads, qk.head_dim) == (HEADS, kv, HEAD_DIM)
    assert (vo.num_heads, vo.num_kv_heads, vo.head_dim) == (HEADS, kv, HEAD_DIM)
    assert (qk.rope, qk.rotary_dim) == (rope, rotary_dim)
    # the detected channel pairs are the ones the module's RoPE really mixes
    assert rope_pairs(qk.rope, qk.rotary_dim, qk.head_dim) == measured_pairs(rope, rotary_dim)
    assert qk.mask is None


@pytest.mark.parametrize("gqa", ["enable_gqa", "repeat_kv"])
def test_hand_written_gqa_head_map_matches_float64_run(gqa: str) -> None:
    t = trace_block(gqa=gqa)
    (vo,) = t.kind("attn_vo")
    torch.manual_seed(0)
    block = Block(gqa=gqa).double()
    cos, sin = rope_tables("half", HEAD_DIM, SEQ, torch.float64)
    x = torch.randn(BATCH, SEQ, HIDDEN, dtype=torch.float64)

    class Call(nn.Module):
        def forward(self, **kw: Any) -> Any:
            return block(x, cos, sin)

    changed = _heads_changed_by_kv_head(Call(), block.attn.v_proj, block.attn.o_proj, {}, vo.num_kv_heads,
                                        vo.num_heads, vo.head_dim)
    group = vo.num_heads // vo.num_kv_heads
    assert changed == {j: set(range(j * group, (j + 1) * group)) for j in range(vo.num_kv_heads)}


def test_symbolic_batch_and_seq_and_a_symbolic_q_scale() -> None:
    """``dynamic=True``: batch/seq are symbols and the float ``self.scaling`` becomes a graph scalar."""
    t = trace_block(dynamic=True, batch=3, seq=5, q_scale=True, rope="half", rotary_dim=HEAD_DIM // 2)
    assert not t.skipped
    (qk,), (vo,) = t.kind("attn_qk"), t.kind("attn_vo")
    assert (qk.num_heads, qk.num_kv_heads, qk.head_dim, qk.rope, qk.rotary_dim) == (
        HEADS, KV_HEADS, HEAD_DIM, "half", HEAD_DIM // 2)
    assert (vo.num_heads, vo.num_kv_heads, vo.head_dim) == (HEADS, KV_HEADS, HEAD_DIM)


def test_unknown_op_before_attention_is_skipped_with_that_op() -> None:
    t = trace_block(q_op="sin")
    assert t.kind("attn_qk") == [] and len(t.kind("attn_vo")) == 1
    sin_nodes = {n.name for n in t.gm.graph.nodes if ops.is_call(n, {torch.sin}, {"sin"})}
    for name in ("attn.q_proj", "attn.k_proj"):
        (s,) = t.skipped_for(name)
        assert "`sin`" in s.reason and s.where in sin_nodes
    assert {u.role for u in t.units} == {"", "v", "o"}


def test_projection_output_used_outside_attention_is_skipped() -> None:
    t = trace_block(leak_q=True)
    assert t.kind("attn_qk") == [] and len(t.kind("attn_vo")) == 1
    (s,) = t.skipped_for("attn.q_proj")
    assert "outside the attention" in s.reason


def test_hand_written_fused_qkv_is_grouped() -> None:
    t = trace_block(fused=True)
    (qk,), (vo,) = t.kind("attn_qk"), t.kind("attn_vo")
    assert [u.part.offset for u in qk.units] == [0, HEADS * HEAD_DIM]
    assert vo.units[0].part.offset == (HEADS + KV_HEADS) * HEAD_DIM


def test_fused_qkv_with_a_broken_v_path_reports_every_part() -> None:
    """q/k of a fused projection grouped, v's path unprovable: v's reason stays in the report under
    the part's name (the parent's name is not a grouped unit), and o carries one too."""
    from sparselora_fx import explain

    torch.manual_seed(0)
    block = Block(fused=True, v_op="sin")
    cos, sin = rope_tables("half", HEAD_DIM, SEQ)
    report = explain(block, torch.randn(BATCH, SEQ, HIDDEN), cos, sin, options={"sparsity": 0.5})
    assert [g.kind for g in report.groups] == ["attn_qk"]
    reasons = {s.name: s.reason for s in report.skipped}
    assert "`sin`" in reasons.get("attn.qkv_proj[v]", ""), reasons
    assert "attn.o_proj" in reasons, reasons
    grouped = {u.fqn for g in report.groups for u in g.units}
    for unit in report.units:  # every unit is grouped or says why not
        assert unit.fqn in grouped or unit.fqn in reasons, (unit.fqn, reasons)
    assert "attn.qkv_proj" not in reasons, "the parent's q/k parts are grouped: name the part"


def test_hand_written_fused_qkv_read_elsewhere_stays_dense() -> None:
    """The rewrite zeroes dropped rows of the fused output: another reader would see them."""
    t = trace_block(fused="leak")
    assert t.groups == []
    reasons = {s.reason for s in t.skipped_for("attn.qkv_proj")}
    assert any("is also read by" in r for r in reasons), t.skipped


def test_hand_written_fused_qkv_unbound_is_reported() -> None:
    t = trace_block(fused="unbind", gqa="none")
    assert t.groups == []
    assert {s.reason for s in t.skipped_for("attn.qkv_proj")} == {FUSED_REASON}


def test_cross_attention_is_grouped() -> None:
    t = trace_block(memory_len=SEQ + 3, rope="none", rotary_dim=0)
    (qk,), (vo,) = t.kind("attn_qk"), t.kind("attn_vo")
    assert [u.fqn for u in qk.units] == ["attn.q_proj", "attn.k_proj"]
    assert qk.units[0].input is not qk.units[1].input
    assert (qk.num_heads, qk.num_kv_heads, qk.rope) == (HEADS, KV_HEADS, "none")


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_hand_written_padding_mask(impl: str) -> None:
    t = trace_block(mask=True, impl=impl)
    assert len(t.groups) == 2
    (placeholder,) = [n for n in t.gm.graph.nodes if n.op == "placeholder" and "attention_mask" in n.name]
    assert all(g.mask is placeholder for g in t.groups)


def test_units_already_grouped_are_not_regrouped() -> None:
    t = trace_block()
    assert len(t.groups) == 2
    again, skipped = find_attention_groups(t.units)
    assert again == []
    assert {s.name for s in skipped} == {"attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj"}
    assert all("already grouped" in s.reason for s in skipped)


def test_attention_inside_a_checkpoint_body_is_grouped_in_that_scope() -> None:
    t = trace_block(checkpoint=True)
    assert len(t.kind("attn_qk")) == 1 and len(t.kind("attn_vo")) == 1
    for g in t.groups:
        scopes = {id(u.scope) for u in g.units}
        assert len(scopes) == 1 and g.units[0].scope.parent is not None
        assert g.attention_node.graph is g.units[0].scope.gm.graph
