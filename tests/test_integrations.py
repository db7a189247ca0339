"""Where users already are: HF Trainer + callback, gradient checkpointing, bf16 autocast, QLoRA/DoRA."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch

from sparselora_fx.backend import LAST_REPORTS
from sparselora_fx.errors import OptionsError
from sparselora_fx.integrations.transformers import (SCHEDULE_FILE, SparseLoRACallback, compile_for_trainer,
                                                     enable_activation_checkpointing, unsupported_modules)
from sparselora_fx.models import build_tiny_model, tiny_batch
from sparselora_fx.passes.analyse.unsupported import DORA_REASON, detect_unsupported
from sparselora_fx.runtime.schedule import StepSchedule

REPO = Path(__file__).resolve().parents[1]
OPTS = {"inner": "aot_eager", "progress": False}


def _lora_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _skipped() -> list[tuple[str, str]]:
    return [(s.name, s.reason) for r in LAST_REPORTS for s in r.skipped]


# ---- the callback on its own (no Trainer) -------------------------------------------------------

def _args(tmp_path: Path) -> types.SimpleNamespace:
    return types.SimpleNamespace(output_dir=str(tmp_path), process_index=0)


def test_callback_counts_steps_saves_and_restores(tmp_path: Path) -> None:
    sched = StepSchedule(2)
    cb = SparseLoRACallback(sched)
    state = types.SimpleNamespace(global_step=0, max_steps=10)
    cb.on_train_begin(_args(tmp_path), state, None)
    phases = []
    for step in range(1, 4):
        phases.append(sched.phase)  # the phase this optimizer step ran in
        state.global_step = step
        cb.on_step_end(_args(tmp_path), state, None)
    assert phases == ["dense", "dense", "sparse"] and sched.steps == 3
    (tmp_path / "checkpoint-3").mkdir()
    cb.on_save(_args(tmp_path), state, None)
    assert json.loads((tmp_path / "checkpoint-3" / SCHEDULE_FILE).read_text()) == sched.state_dict()

    fresh = StepSchedule(7)  # a resumed run: the saved warm-up and count win, as in load_state_dict
    SparseLoRACallback(fresh).on_train_begin(_args(tmp_path), types.SimpleNamespace(global_step=3), None)
    assert (fresh.steps, fresh.warmup_steps, fresh.phase) == (3, 2, "sparse")


def test_callback_without_saved_file_follows_global_step_and_resolves_fraction(tmp_path: Path) -> None:
    from sparselora_fx import Policy

    policy = Policy(source="t", warmup_fraction=0.25).with_sparsity(0.5)
    model = torch.nn.Linear(4, 4)
    _, cb = compile_for_trainer(model, policy, **OPTS)
    cb.on_train_begin(_args(tmp_path), types.SimpleNamespace(global_step=0, max_steps=20), None)
    assert (cb.schedule.warmup_steps, cb.schedule.total_steps) == (5, 20)
    sched = StepSchedule(2)
    SparseLoRACallback(sched).on_train_begin(_args(tmp_path), types.SimpleNamespace(global_step=4), None)
    assert sched.steps == 4 and sched.phase == "sparse"


def test_callback_refuses_double_counting(tmp_path: Path) -> None:
    sched = StepSchedule(2)
    cb = SparseLoRACallback(sched)
    state = types.SimpleNamespace(global_step=0, max_steps=10)
    cb.on_train_begin(_args(tmp_path), state, None)
    sched.step()  # counted by the hook of an attached optimizer: tolerated ...
    state.global_step = 1
    cb.on_step_end(_args(tmp_path), state, None)
    assert sched.steps == 1
    sched.step()
    sched.step()  # ... but a count running ahead of the Trainer is an error that says why
    state.global_step = 2
    with pytest.raises(OptionsError, match="one place only"):
        cb.on_step_end(_args(tmp_path), state, None)
    with pytest.raises(OptionsError, match="StepSchedule"):
        SparseLoRACallback(object())  # type: ignore[arg-type]


# ---- the Trainer end to end ----------------------------------------------------------------------

def _example():
    sys.path.insert(0, str(REPO / "examples"))
    try:
        import trainer_example
    finally:
        sys.path.pop(0)
    return trainer_example


def test_trainer_warmup_is_dense_then_sparse_and_resume_continues(tmp_path: Path) -> None:
    """5 Trainer steps (warm-up 2, sparsity 0.5): steps 1-2 equal an uncompiled Trainer, later ones
    differ; the checkpoint at step 3 holds the schedule and a resumed run continues sparse."""
    ex = _example()
    dense = ex.run(compile=False, output_dir=str(tmp_path / "dense"), num_layers=1)["losses"]
    out = ex.run("eager", output_dir=str(tmp_path / "sparse"), save_strategy="steps", save_steps=3, num_layers=1)
    losses, sched = out["losses"], out["callback"].schedule
    assert len(losses) == len(dense) == 5
    assert losses[:2] == pytest.approx(dense[:2], rel=1e-5)
    assert all(abs(a - b) > 1e-6 for a, b in zip(losses[2:], dense[2:]))
    assert (sched.steps, sched.phase) == (5, "sparse")
    saved = json.loads((tmp_path / "sparse" / "checkpoint-3" / SCHEDULE_FILE).read_text())
    assert saved == {"steps": 3, "warmup_steps": 2, "total_steps": None}
    assert any(g.sparsity == 0.5 for r in LAST_REPORTS for g in r.groups)

    torch._dynamo.reset()
    resumed = ex.run("eager", output_dir=str(tmp_path / "sparse"), num_layers=1,
                     resume=str(tmp_path / "sparse" / "checkpoint-3"))
    assert resumed["callback"].schedule.steps == 5
    assert resumed["losses"][-2:] == pytest.approx(losses[3:], rel=1e-5)  # log_history holds steps 1-3 too


def test_trl_sft_trainer_is_a_trainer() -> None:
    """TRL's SFTTrainer inherits the callback machinery the integration relies on."""
    trl = pytest.importorskip("trl")
    from transformers import Trainer

    assert issubclass(trl.SFTTrainer, Trainer)


# ---- gradient checkpointing ----------------------------------------------------------------------

def _checkpointed_run(gc: bool, bodies: dict[str, int] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and LoRA grads at sparsity 0.5 (float64, aot_eager); ``bodies`` collects sparse ops per HOP body."""
    from sparselora_fx.backend import analyse_and_rewrite, lower
    from sparselora_fx.settings import Settings

    torch._dynamo.reset()
    model = build_tiny_model("llama", num_layers=1, dtype=torch.float64, init_lora_b=True)
    if gc:
        enable_activation_checkpointing(model)
    settings = Settings.from_options({**OPTS, "sparsity": 0.5})

    def backend(gm, example_inputs, **_):  # the sparselora backend, keeping the rewritten graph to look at
        _, out = analyse_and_rewrite(gm, example_inputs, settings)
        for name, sub in out.named_children():
            if isinstance(sub, torch.fx.GraphModule) and bodies is not None:
                bodies[name] = sum("sparselora" in str(n.target) for n in sub.graph.nodes)
        return lower(out, example_inputs, settings)

    loss = torch.compile(model, backend=backend)(**tiny_batch("llama"))
    loss.loss.backward()
    return loss.loss.detach(), _lora_grads(model)


@pytest.fixture
def dynamo_checkpoint_switch():
    """Restores the Dynamo switch ``enable_activation_checkpointing`` sets, so other tests see the default."""
    before = torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint
    yield
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = before


def test_gradient_checkpointing_rewrites_inside_checkpoint_bodies(dynamo_checkpoint_switch) -> None:
    """Non-reentrant checkpointing (``enable_activation_checkpointing``): each checkpointed decoder
    layer reaches the backend as one higher-order-op body (``wrap_body_*``), the units are found AND
    rewritten inside it, and loss and LoRA grads equal the run without checkpointing (float64,
    sparsity 0.5). On transformers 5.25 a bare ``gradient_checkpointing_enable()`` leaves the layer
    to eager (a side effect inside the checkpoint), so no body reaches the backend: this test's
    ``bodies`` assertion is what fails then."""
    model = build_tiny_model("llama", num_layers=1, dtype=torch.float64, init_lora_b=True)
    dense_loss = model(**tiny_batch("llama")).loss.detach()
    bodies: dict[str, int] = {}
    loss, grads = _checkpointed_run(True, bodies)
    ref_loss, ref_grads = _checkpointed_run(False)
    assert len(bodies) == 1 and all(n > 0 for n in bodies.values()), bodies  # the decoder layer's body
    assert abs(dense_loss - loss) > 1e-6  # the sparsity acted inside the body
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    assert grads.keys() == ref_grads.keys() and len(grads) == 14
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-10, atol=1e-12, msg=name)


def test_enable_activation_checkpointing_refuses_reentrant() -> None:
    model = build_tiny_model("llama", num_layers=1)
    with pytest.raises(OptionsError, match="use_reentrant=True is an autograd.Function"):
        enable_activation_checkpointing(model, use_reentrant=True)


def test_callback_prepares_checkpointing_the_trainer_enabled(dynamo_checkpoint_switch) -> None:
    """The Trainer turns checkpointing on itself (``args.gradient_checkpointing``) before
    ``on_train_begin``; the callback then sets the Dynamo switch the checkpointed layers need."""
    from types import SimpleNamespace

    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = False
    model = build_tiny_model("llama", num_layers=1)
    state = SimpleNamespace(global_step=0, max_steps=4)
    callback = SparseLoRACallback(StepSchedule(1))
    callback.on_train_begin(SimpleNamespace(output_dir="unused"), state, None, model=model)
    assert torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint is False  # not checkpointed
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    callback.on_train_begin(SimpleNamespace(output_dir="unused"), state, None, model=model)
    assert torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint is True


# ---- bf16 base, fp32 LoRA, autocast ----------------------------------------------------------------

def test_bf16_base_fp32_lora_autocast_matches_dense_compile() -> None:
    def run(backend: str, options: dict | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        torch._dynamo.reset()
        model = build_tiny_model("llama", num_layers=2, dtype=torch.bfloat16, init_lora_b=True)
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.data = p.data.float()
        compiled = torch.compile(model, backend=backend, options=options)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = compiled(**tiny_batch("llama")).loss
        loss.float().backward()
        return loss.detach().float(), _lora_grads(model)

    ref_loss, ref_grads = run("aot_eager", None)
    LAST_REPORTS.clear()
    loss, grads = run("sparselora", {**OPTS, "sparsity": 0.0})
    assert sum(len(r.groups) for r in LAST_REPORTS) == 6  # found and rewritten under autocast
    assert all(g.dtype == torch.float32 for g in grads.values())
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=2e-2)
    for name in ref_grads:
        scale = ref_grads[name].abs().max().item()
        assert (grads[name] - ref_grads[name]).abs().max().item() <= 5e-2 * scale + 1e-6, name


# ---- QLoRA / DoRA stay dense, with the reason in the report ---------------------------------------

def _dora_model() -> torch.nn.Module:
    import peft
    import transformers as tf

    from sparselora_fx.models import _tiny_config

    torch.manual_seed(0)
    base = tf.AutoModelForCausalLM.from_config(_tiny_config("llama", 1)).double()
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "gate_proj", "up_proj", "down_proj"],
                           use_dora=True)
    return peft.get_peft_model(base, lora)


DORA_NAMES = {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.mlp.gate_proj",
              "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"}


def test_dora_layers_are_listed_by_name_and_skipped() -> None:
    model = _dora_model()
    assert {n for n, r in unsupported_modules(model)} == DORA_NAMES
    batch = tiny_batch("llama")
    ref = model(**batch).loss
    LAST_REPORTS.clear()
    loss = torch.compile(model, backend="sparselora", options={**OPTS, "sparsity": 0.5})(**batch).loss
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)  # nothing was sparsified
    skipped = [(n, r) for n, r in _skipped() if r.startswith(DORA_REASON)]
    assert skipped, _skipped()  # PEFT's DoRA layer breaks the graph: frame-local names, the reason says so
    assert all("unsupported_modules" in r for _, r in skipped)
    assert not any(g.sparsity for r in LAST_REPORTS for g in r.groups
                   if {u.fqn for u in g.units} & DORA_NAMES)


def test_dora_in_one_graph_is_named_by_module_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without PEFT's graph break (its torchao check), the report names each DoRA layer's module."""
    import peft.tuners.lora.dora as dora

    monkeypatch.setattr(dora, "dequantize_module_weight", lambda module: module.weight)
    model = _dora_model()
    LAST_REPORTS.clear()
    torch.compile(model, backend="sparselora", options={**OPTS, "sparsity": 0.5})(**tiny_batch("llama"))
    named = {n for n, r in _skipped() if r == DORA_REASON}
    assert named == DORA_NAMES, _skipped()


class _Int8Lora(torch.nn.Module):
    """A GPTQ/HQQ-style frozen int8 weight dequantized in forward, plus LoRA."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("qweight", torch.randint(-127, 128, (24, 16), generator=g, dtype=torch.int8))
        self.register_buffer("scale", torch.rand(24, 1, generator=g, dtype=torch.float64) / 100)
        self.lora_A = torch.nn.Parameter(torch.randn(4, 16, generator=g, dtype=torch.float64))
        self.lora_B = torch.nn.Parameter(torch.randn(24, 4, generator=g, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.qweight.to(x.dtype) * self.scale
        return torch.nn.functional.linear(x, w) + 2.0 * torch.nn.functional.linear(
            torch.nn.functional.linear(x, self.lora_A), self.lora_B)


def test_int8_dequantized_base_is_reported_as_qlora() -> None:
    model = _Int8Lora()
    x = torch.randn(3, 16, dtype=torch.float64)
    LAST_REPORTS.clear()
    out = torch.compile(model, backend="sparselora", options={**OPTS, "sparsity": 0.5})(x)
    torch.testing.assert_close(out, model(x))
    assert [(n, r.split(":")[0]) for n, r in _skipped()] == [("qweight", "QLoRA")]
    assert "torch.int8" in _skipped()[0][1]


def test_no_false_positives_on_plain_lora() -> None:
    model = build_tiny_model("llama", num_layers=1, dtype=torch.float64)
    graphs = []
    torch.compile(model, backend=lambda gm, ex, **_: graphs.append(gm) or gm.forward)(**tiny_batch("llama"))
    assert graphs and all(detect_unsupported(gm) == [] for gm in graphs)
    assert unsupported_modules(model) == []


def test_bitsandbytes_4bit_base_is_reported_as_qlora() -> None:
    bnb = pytest.importorskip("bitsandbytes")
    import peft

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            dense = torch.nn.Linear(64, 96, bias=False)
            self.proj = bnb.nn.Linear4bit(64, 96, bias=False, compute_dtype=torch.float32, quant_type="nf4")
            self.proj.weight = bnb.nn.Params4bit(dense.weight.data, requires_grad=False, quant_type="nf4")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x)

    try:
        model = peft.get_peft_model(Net().to("cpu"), peft.LoraConfig(r=4, target_modules=["proj"]))
        x = torch.randn(2, 64)
        ref = model(x)
    except Exception as err:  # a bitsandbytes build without CPU 4-bit kernels
        pytest.skip(f"bitsandbytes 4-bit does not run on this CPU build: {err}")
    assert [n for n, _ in unsupported_modules(model)] == ["proj"]
    LAST_REPORTS.clear()
    out = torch.compile(model, backend="sparselora", options={**OPTS, "sparsity": 0.5})(x)
    torch.testing.assert_close(out, ref)
    assert [n for n, r in _skipped() if r.startswith("QLoRA")] == ["proj"]
