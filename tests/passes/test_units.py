"""The unit matcher: every linear+LoRA spelling, and nothing else."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparselora_fx.models import TINY_ARCHITECTURES, build_tiny_model, tiny_batch
from sparselora_fx.passes import graph_ops as ops
from sparselora_fx.passes.analyse.units import detect_unmatched, find_lora_units
from tests.conftest import analysis_model, trace_graphs


def _lora_wrapped_names(model: nn.Module) -> set[str]:
    from sparselora_fx.names import normalize_module_name

    names = set()
    for name, mod in model.named_modules():
        lora_a = getattr(mod, "lora_A", None)
        if isinstance(lora_a, nn.ModuleDict) and len(lora_a) > 0:
            names.add(normalize_module_name(name))
    return names


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_every_peft_lora_linear_is_matched(arch: str) -> None:
    model = analysis_model(arch, lora_dropout=0.05)
    (gm,) = trace_graphs(model, **tiny_batch(arch))
    units = find_lora_units(gm)
    expected = _lora_wrapped_names(model)
    assert len(units) == len(expected)
    assert {u.fqn for u in units} == expected
    for u in units:
        assert u.branches and u.branches[0].scale == pytest.approx(2.0)
        assert u.branches[0].dropout is not None
        assert not u.fqn.startswith("base_model") and ".base_layer" not in u.fqn


def test_peft_without_dropout_and_fqn_shape() -> None:
    model = build_tiny_model("llama", lora_dropout=0.0)
    (gm,) = trace_graphs(model, **tiny_batch("llama"))
    units = find_lora_units(gm)
    assert [u.fqn for u in units[:3]] == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"]
    assert all(u.branches[0].dropout is None for u in units)
    q = units[0]
    assert (q.in_features, q.out_features, q.lora_rank) == (64, 64, 4)


def test_two_active_adapters_on_one_base() -> None:
    import peft

    model = build_tiny_model("llama", num_layers=1)
    model.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"]))
    model.base_model.set_adapter(["default", "second"])
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    (gm,) = trace_graphs(model, **tiny_batch("llama"))
    units = {u.fqn: u for u in find_lora_units(gm)}
    assert len(units) == 7
    q = units["model.layers.0.self_attn.q_proj"]
    assert len(q.branches) == 2
    assert sorted(b.scale for b in q.branches) == [1.0, 2.0]
    assert q.lora_rank == 6


class HandLoRA(nn.Module):
    """Hand-written LoRA in several spellings (not PEFT)."""

    def __init__(self, d_in: int, d_out: int, spelling: str, r: int = 4):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / d_in**0.5, requires_grad=False)
        self.A = nn.Parameter(torch.randn(r, d_in) * 0.1)
        self.B = nn.Parameter(torch.randn(d_out, r) * 0.1)
        self.spelling = spelling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spelling
        if s == "matmul_T":
            return x @ self.weight.T + 0.5 * ((x @ self.A.t()) @ self.B.T)
        if s == "torch_matmul":
            return torch.matmul(x, self.weight.t()) + torch.matmul(torch.matmul(x, self.A.transpose(0, 1)),
                                                                   self.B.transpose(-1, -2))
        if s == "linear_iadd":
            y = F.linear(x, self.weight)
            y += F.linear(F.linear(x, self.A), self.B) * 2
            return y
        if s == "scale_left_cast":
            base = F.linear(x, self.weight)
            return base + 3.0 * F.linear(F.linear(x.to(torch.float32), self.A), self.B)
        if s == "scale_between":
            return F.linear(x, self.weight) + F.linear(F.linear(x, self.A) * 0.25, self.B)
        raise AssertionError(s)


SPELLINGS = ["matmul_T", "torch_matmul", "linear_iadd", "scale_left_cast", "scale_between"]


@pytest.mark.parametrize("spelling", SPELLINGS)
@pytest.mark.parametrize("dims", [2, 3])
def test_hand_written_spellings(spelling: str, dims: int) -> None:
    model = nn.Sequential(HandLoRA(8, 12, spelling), nn.ReLU(), HandLoRA(12, 8, spelling))
    x = torch.randn(5, 8) if dims == 2 else torch.randn(2, 5, 8)
    (gm,) = trace_graphs(model, x)
    units = find_lora_units(gm)
    assert [u.fqn for u in units] == ["0", "2"]
    assert [(u.in_features, u.out_features) for u in units] == [(8, 12), (12, 8)]
    expected_scale = {"matmul_T": 0.5, "torch_matmul": 1.0, "linear_iadd": 2.0, "scale_left_cast": 3.0,
                      "scale_between": 0.25}[spelling]
    assert units[0].branches[0].scale == expected_scale


class NotLoRA(nn.Module):
    def __init__(self, case: str):
        super().__init__()
        self.case = case
        self.weight = nn.Parameter(torch.randn(8, 8), requires_grad=(case == "trainable_base"))
        self.A = nn.Parameter(torch.randn(2, 8))
        self.B = nn.Parameter(torch.randn(8, 2))

    def forward(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        if self.case == "trainable_base":
            return F.linear(x, self.weight) + F.linear(F.linear(x, self.A), self.B)
        if self.case == "other_input":
            return F.linear(x, self.weight) + F.linear(F.linear(other, self.A), self.B)
        if self.case == "merged":
            return F.linear(x, self.weight)
        raise AssertionError(self.case)


@pytest.mark.parametrize("case", ["trainable_base", "other_input", "merged"])
def test_not_matched(case: str) -> None:
    (gm,) = trace_graphs(NotLoRA(case), torch.randn(3, 8), torch.randn(3, 8))
    assert find_lora_units(gm) == []


def test_units_inside_activation_checkpoint_bodies() -> None:
    from torch.utils.checkpoint import checkpoint

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = HandLoRA(8, 8, "linear_iadd")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return checkpoint(self.fc, x, use_reentrant=False)

    model = nn.Sequential(Block(), Block())
    (gm,) = trace_graphs(model, torch.randn(4, 8, requires_grad=True))
    units = find_lora_units(gm)
    assert len(units) == 2
    assert all(u.scope.parent is not None for u in units), "units should be found inside the HOP bodies"
    assert [u.fqn for u in units] == ["0.fc", "1.fc"]


# ---- ops between the base product and the LoRA sum -------------------------------------------------


class SeparateBias(nn.Module):
    """``y = x @ W.T``, then a frozen bias / scale / cast as their own ops, then ``+ lora(x)``."""

    def __init__(self, d_in: int, d_out: int, spelling: str, r: int = 2):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / d_in**0.5, requires_grad=False)
        self.bias = nn.Parameter(torch.randn(d_out) * 0.1, requires_grad=False)
        self.g = nn.Parameter(torch.rand(d_out) + 0.5, requires_grad=False)
        self.A = nn.Parameter(torch.randn(r, d_in) * 0.1)
        self.B = nn.Parameter(torch.randn(d_out, r) * 0.1)
        self.trained_bias = nn.Parameter(torch.zeros(d_out))
        self.spelling = spelling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, b = self.spelling, self.bias
        y = x @ self.weight.T
        if s == "plain":  # no op between: matched as ever
            pass
        elif s == "add":
            y = y + b
        elif s == "bias_first":
            y = b + y
        elif s == "torch_add":
            y = torch.add(y, b)
        elif s == "add_method":
            y = y.add(b)
        elif s == "casts":
            y = y.float().half().float() + b.to(torch.float32)
        elif s == "scale_then_bias":
            y = (y * self.g) * 0.5 + b
        elif s == "relu":  # not channel-selection-compatible: no unit
            y = torch.relu(y + b)
        elif s == "trainable_bias":  # a bias that trains is not a frozen bias: no unit
            y = y + self.trained_bias
        out = y + (x @ self.A.T) @ self.B.T * 0.5
        if s == "read_twice":  # the base product also feeds something else: no unit
            out = out + y.mean()
        return out


POST_SPELLINGS = {"add": ["bias"], "bias_first": ["bias"], "torch_add": ["bias"], "add_method": ["bias"],
                  "casts": ["cast", "cast", "cast", "bias"], "scale_then_bias": ["scale", "scale", "bias"]}


@pytest.mark.parametrize("spelling", list(POST_SPELLINGS))
def test_bias_add_scale_and_casts_between_base_and_lora_sum_are_part_of_the_unit(spelling: str) -> None:
    model = nn.Sequential(SeparateBias(8, 12, spelling), nn.ReLU(), SeparateBias(12, 8, spelling))
    (gm,) = trace_graphs(model, torch.randn(2, 5, 8))
    units = find_lora_units(gm)
    assert [u.fqn for u in units] == ["0", "2"]
    assert [(u.in_features, u.out_features) for u in units] == [(8, 12), (12, 8)]
    for u in units:
        assert [p.kind for p in u.post] == POST_SPELLINGS[spelling]
        assert u.branches[0].scale == 0.5 and u.base.bias is None
        vectors = [p.operand for p in u.post if p.vector]
        assert all(tuple(ops.example_value(v).shape) == (u.out_features,) for v in vectors)


@pytest.mark.parametrize("spelling,stop", [("relu", "relu"), ("read_twice", None), ("trainable_bias", "add")])
def test_frozen_linear_meeting_lora_but_not_matched_is_reported_with_the_stopping_node(spelling, stop) -> None:
    from sparselora_fx import backend

    torch.manual_seed(0)
    model = nn.Sequential(SeparateBias(8, 8, spelling), nn.Tanh(), SeparateBias(8, 8, "plain"))
    (gm,) = trace_graphs(model, torch.randn(2, 5, 8))
    assert [u.fqn for u in find_lora_units(gm)] == ["2"]
    found = detect_unmatched(gm, find_lora_units(gm))
    assert [name for name, _, _ in found] == ["0"]
    (name, reason, where), = found
    node = next(n for n in gm.graph.nodes if n.name == where)
    if spelling == "read_twice":  # the product itself, read by the LoRA sum and by `.sum()`
        assert ops.as_linear(node) is not None and len(node.users) == 2 and "read by 2 ops" in reason
    else:
        assert getattr(node.target, "__name__", node.target) == stop and f"`{where}`" in reason
    assert "runs dense" in reason

    backend.LAST_REPORTS.clear()
    options = {"inner": "aot_eager", "sparsity": 0.5, "progress": False}
    torch.compile(model, backend="sparselora", options=options)(torch.randn(2, 5, 8))
    skipped = [s for s in backend.LAST_REPORTS[-1].skipped if s.name == "0"]
    assert [(s.reason, s.where) for s in skipped] == [(reason, where)]
