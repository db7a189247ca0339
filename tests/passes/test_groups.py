"""Grouping over every tiny architecture: exact counts, head layouts, and stated skip reasons."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparselora_fx
from sparselora_fx.models import TINY_ARCHITECTURES, tiny_batch
from sparselora_fx.counters import counters
from tests.conftest import analysis_model
from tests.passes.test_units import HandLoRA

# arch -> (units, gated_mlp, mlp, attn_qk, attn_vo) for 2 layers with LoRA on every linear
# Fused projections are reported as their parts (qkv_proj -> [q], [k], [v]): units counts those.
EXPECTED = {
    "llama": (14, 2, 0, 2, 2),
    "qwen2": (14, 2, 0, 2, 2),
    "qwen3": (14, 2, 0, 0, 2),  # q_norm/k_norm before RoPE: Q/K dense
    "mistral": (14, 2, 0, 2, 2),
    "gemma": (14, 2, 0, 2, 2),
    "gemma2": (14, 2, 0, 2, 2),
    "opt": (12, 0, 2, 2, 2),
    "bert": (13, 0, 2, 2, 2),  # + the pooler's dense, in no group
    "gpt_neox": (12, 0, 2, 2, 2),  # 8 matched; fused query_key_value as 3 parts
    "phi3": (14, 2, 0, 2, 2),  # 8 matched; fused qkv_proj as 3 parts, gate_up_proj as 2
    "gpt2": (12, 0, 2, 2, 2),  # 8 matched (Conv1D); fused c_attn as 3 parts
}
MATCHED = {"gpt_neox": 8, "phi3": 8, "gpt2": 8}


def _explain(arch: str):
    batch = tiny_batch(arch)
    batch.pop("labels")
    if arch != "bert":
        batch["use_cache"] = False
    return sparselora_fx.explain(analysis_model(arch), options={"sparsity": 0.5}, **batch)


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_groups_per_architecture(arch: str) -> None:
    counters.clear()
    report = _explain(arch)
    n_units, gated, mlp, qk, vo = EXPECTED[arch]
    counts = report.counts()
    assert report.graphs == 1, "tracing must not add a graph break"
    assert counts["units"] == n_units
    assert (counts.get("gated_mlp", 0), counts.get("mlp", 0), counts.get("attn_qk", 0), counts.get("attn_vo", 0)) == (
        gated, mlp, qk, vo)
    assert counters["sparselora"]["units_matched"] == MATCHED.get(arch, n_units)
    assert [counters["sparselora"][f"group_{k}"] for k in ("gated_mlp", "mlp", "attn_qk", "attn_vo")] == [
        gated, mlp, qk, vo]
    grouped = {u.fqn for g in report.groups for u in g.units}
    skipped = {s.name: s.reason for s in report.skipped}
    assert grouped | set(skipped) >= {u.fqn for u in report.units}, "every unit is grouped or has a reason"
    gqa = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "phi3")
    rope = {"opt": ("none", 0), "bert": ("none", 0), "gpt2": ("none", 0), "gpt_neox": ("half", 8)}
    for g in report.groups:
        if g.kind.startswith("attn"):
            assert g.num_heads == 4 and g.head_dim == 16
            assert g.num_kv_heads == (2 if arch in gqa else 4)
        if g.kind == "attn_qk":
            assert (g.rope, g.rotary_dim) == rope.get(arch, ("half", 16))
        if g.kind == "gated_mlp":
            assert [u.role for u in g.units] == ["gate", "up", "down"]
            assert g.act == ("gelu_tanh" if arch in ("gemma", "gemma2") else "silu")
        if g.kind == "mlp":
            assert g.act == {"gpt2": "gelu_tanh", "gpt_neox": "gelu", "opt": "relu", "bert": "gelu"}[arch]
    assert not [r for r in skipped.values() if "fused" in r], skipped
    if arch == "phi3":
        names = [u.fqn for g in report.groups for u in g.units]
        assert names[:3] == ["model.layers.0.mlp.gate_up_proj[gate]", "model.layers.0.mlp.gate_up_proj[up]",
                             "model.layers.0.mlp.down_proj"]
        assert "model.layers.0.self_attn.qkv_proj[v]" in names
    if arch == "qwen3":
        assert "per-head norm" in skipped["model.layers.0.self_attn.q_proj"]


def test_report_prints_tables() -> None:
    text = str(_explain("llama"))
    assert "gated_mlp" in text and "model.layers.1.mlp.down_proj" in text and "half:16" in text


class HandGatedMLP(nn.Module):
    def __init__(self, act: str = "silu", between: str = "") -> None:
        super().__init__()
        self.gate, self.up, self.down = HandLoRA(8, 16, "matmul_T"), HandLoRA(8, 16, "linear_iadd"), HandLoRA(
            16, 8, "scale_between")
        self.act, self.between = act, between

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate(x)
        h = (F.silu(g) if self.act == "silu" else F.gelu(g, approximate="tanh")) * self.up(x)
        if self.between == "cumsum":
            h = torch.cumsum(h, dim=-1)  # mixes channels: not provable
        if self.between == "leak":
            self.leaked = h.sum()
        return self.down(h)


def test_hand_written_gated_mlp_grouped() -> None:
    report = sparselora_fx.explain(HandGatedMLP("gelu"), torch.randn(2, 5, 8), options={"sparsity": 0.5})
    (g,) = report.groups
    assert g.kind == "gated_mlp" and g.act == "gelu_tanh"
    assert [u.fqn for u in g.units] == ["gate", "up", "down"]
    assert g.keep == 8 and g.channels == 16


def test_unknown_op_between_projections_is_skipped_with_its_name() -> None:
    report = sparselora_fx.explain(HandGatedMLP(between="cumsum"), torch.randn(2, 5, 8))
    assert report.groups == []
    reasons = {s.name: s for s in report.skipped}
    assert "cumsum" in reasons["down"].reason and reasons["down"].where


def test_intermediate_used_outside_is_not_grouped() -> None:
    report = sparselora_fx.explain(HandGatedMLP(between="leak"), torch.randn(2, 5, 8))
    assert report.groups == []
    assert any("outside the MLP" in s.reason for s in report.skipped)


def test_group_kinds_come_from_the_policy() -> None:
    from typing import get_args

    from sparselora_fx.passes.analyse.groups import GROUP_KINDS, ROLES, GroupKind
    from sparselora_fx.policy import GROUP_KINDS as POLICY_GROUP_KINDS

    assert GROUP_KINDS == tuple(POLICY_GROUP_KINDS) == get_args(GroupKind) == tuple(ROLES)
    assert GROUP_KINDS == ("gated_mlp", "mlp", "attn_qk", "attn_vo")
