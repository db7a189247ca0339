"""Five Trainer steps on a tiny LoRA Llama with the sparselora backend (CPU, no downloads).

    python examples/trainer_example.py                 # Inductor (compiles take a while on CPU)
    python examples/trainer_example.py --inner aot_eager

The model is compiled IN PLACE before the Trainer is built (``TrainingArguments.torch_compile``
cannot name our backend); ``SparseLoRACallback`` runs the dense warm-up, then sparse, and saves
the schedule with each checkpoint. Works the same with TRL's SFTTrainer (a Trainer subclass).
"""

from __future__ import annotations

import argparse
import tempfile
from typing import Any

import torch


def tiny_dataset(n: int = 16, seq: int = 16, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """An in-memory causal-LM dataset of random token ids (labels = inputs)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(2, 128, (seq,), generator=g)
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return rows


def training_args(output_dir: str, max_steps: int = 5, **overrides: Any) -> Any:
    """CPU-only, no reporting, no shuffling surprises: the same batches every run."""
    from transformers import TrainingArguments

    kw = dict(output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=2, learning_rate=1e-2,
              lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none",
              use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True)
    kw.update(overrides)
    return TrainingArguments(**kw)


def run(inner: str = "inductor", *, sparsity: float = 0.5, warmup_steps: int = 2, max_steps: int = 5,
        output_dir: str | None = None, compile: bool = True, resume: str | bool | None = None,
        num_layers: int = 2, **arg_overrides: Any) -> dict[str, Any]:
    """Train; returns the Trainer, the callback (None uncompiled) and the logged losses."""
    from transformers import Trainer

    from sparselora_fx import Policy
    from sparselora_fx.integrations.transformers import compile_for_trainer
    from sparselora_fx.models import build_tiny_model

    torch.manual_seed(0)
    model = build_tiny_model("llama", num_layers=num_layers, init_lora_b=True)
    callback = None
    if compile:
        policy = Policy(source="trainer_example", warmup_steps=warmup_steps).with_sparsity(sparsity)
        model, callback = compile_for_trainer(model, policy, inner=inner, progress=False)
    output_dir = output_dir or tempfile.mkdtemp(prefix="sparselora-trainer-")
    trainer = Trainer(model=model, args=training_args(output_dir, max_steps, **arg_overrides),
                      train_dataset=tiny_dataset(), callbacks=[callback] if callback else None)
    trainer.train(resume_from_checkpoint=resume)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"trainer": trainer, "callback": callback, "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inner", default="inductor", choices=["inductor", "aot_eager", "eager"])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    a = parser.parse_args()
    out = run(a.inner, sparsity=a.sparsity, warmup_steps=a.warmup_steps, max_steps=a.steps)
    from sparselora_fx.backend import LAST_REPORTS

    print("losses:", [round(x, 4) for x in out["losses"]])
    print("schedule:", out["callback"].schedule)
    if LAST_REPORTS:
        print(LAST_REPORTS[-1])


if __name__ == "__main__":
    main()
