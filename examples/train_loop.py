"""A plain PyTorch loop with the sparselora backend: warm-up, sparse steps, checkpoint, resume.

    python examples/train_loop.py --inner aot_eager

Gradient checkpointing (non-reentrant) and bf16 autocast are optional flags; both work with the
backend (the rewrite runs inside checkpointed regions, and under autocast the LoRA weights stay fp32).
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path

import torch

from sparselora_fx import Policy
from sparselora_fx.models import build_tiny_model, tiny_batch
from sparselora_fx.runtime.schedule import StepSchedule


def train(steps: int, *, inner: str, warmup: int, sparsity: float, ckpt: Path, resume: bool,
          checkpointing: bool, bf16: bool) -> list[float]:
    """Train ``steps`` optimizer steps (continuing from ``ckpt`` if ``resume``); returns the losses."""
    torch._dynamo.reset()
    model = build_tiny_model("llama", num_layers=2, dtype=torch.bfloat16 if bf16 else torch.float32, init_lora_b=True)
    if bf16:  # bf16 frozen base, fp32 LoRA weights (the usual mixed setup)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    schedule = StepSchedule(warmup)
    if resume:
        state = torch.load(ckpt, weights_only=True)
        model.load_state_dict(state["model"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
    schedule.attach(optimizer)
    policy = Policy(source="train_loop", warmup_steps=warmup).with_sparsity(sparsity)
    step_fn = torch.compile(model, backend="sparselora",
                            options={"policy": policy, "schedule": schedule, "inner": inner, "progress": False})
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    losses = []
    for step in range(schedule.steps, steps):
        with autocast:
            loss = step_fn(**tiny_batch("llama", seed=step)).loss
        loss.backward()
        optimizer.step()  # the schedule advances here
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        print(f"step {step + 1}: loss {loss.item():.4f} ({'dense' if step < warmup else 'sparse'})")
    trainable = {n: p for n, p in model.state_dict().items() if "lora_" in n}
    torch.save({"model": trainable, "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()}, ckpt)
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inner", default="inductor", choices=["inductor", "aot_eager", "eager"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--checkpointing", action="store_true", help="non-reentrant gradient checkpointing")
    parser.add_argument("--bf16", action="store_true", help="bf16 base, fp32 LoRA, CPU autocast")
    a = parser.parse_args()
    ckpt = Path(tempfile.mkdtemp(prefix="sparselora-loop-")) / "ckpt.pt"
    kw = dict(inner=a.inner, warmup=a.warmup, sparsity=a.sparsity, ckpt=ckpt, checkpointing=a.checkpointing,
              bf16=a.bf16)
    train(a.steps // 2, resume=False, **kw)
    print(f"-- checkpoint saved to {ckpt}; resuming in a fresh compile")
    train(a.steps, resume=True, **kw)


if __name__ == "__main__":
    main()
