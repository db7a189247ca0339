"""``sparselora-fx``: ``demo`` (the main job), ``inspect`` (what the backend does to a model), ``fidelity``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch


def _build_inspect_model(args: argparse.Namespace) -> tuple[torch.nn.Module, dict[str, Any], str]:
    """The model to inspect plus example inputs: a built-in tiny config or a local HF folder on meta."""
    from .models import build_tiny_model, tiny_batch

    if args.model is None:
        model = build_tiny_model(args.arch, num_layers=args.layers, lora_rank=args.lora_rank)
        batch = tiny_batch(args.arch, batch=args.batch, seq=args.seq)
        batch.pop("labels", None)
        if args.arch != "bert":
            batch["use_cache"] = False
        return model, batch, f"built-in tiny {args.arch} ({args.layers} layers, random weights)"

    import peft
    import transformers as tf

    path = Path(args.model)
    if not (path / "config.json").is_file():
        raise SystemExit(f"error: {path} is not a Hugging Face model folder (no config.json in it). "
                         "Pass a local folder saved with save_pretrained, or drop --model for the built-in tiny model.")
    config = tf.AutoConfig.from_pretrained(path, local_files_only=True)
    with torch.device("meta"):  # no weights are read: an 8B folder needs no 32 GB
        if getattr(config, "is_encoder_decoder", False) or "ForSequenceClassification" in str(config.architectures):
            model = tf.AutoModelForSequenceClassification.from_config(config)
        else:
            model = tf.AutoModelForCausalLM.from_config(config)
        lora = peft.LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, target_modules=args.lora_targets)
        model = peft.get_peft_model(model, lora)
    model.train()
    ids = torch.zeros(args.batch, args.seq, dtype=torch.long, device="meta")
    return model, {"input_ids": ids, "use_cache": False}, f"{path} on the meta device (no weights read)"


def cmd_inspect(args: argparse.Namespace) -> int:
    from . import explain

    options: dict[str, Any] = {}
    if args.policy:
        options["policy"] = args.policy
    if args.sparsity is not None:
        options["sparsity"] = args.sparsity
    model, batch, what = _build_inspect_model(args)
    start = time.perf_counter()
    report = explain(model, options=options, **batch)
    elapsed = time.perf_counter() - start
    if args.json:
        print(report.to_json())
    else:
        print(f"model: {what}; traced in {elapsed:.1f} s")
        print(report)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Fine-tune the embedded default (or --model) twice, dense LoRA and SparseLoRA, and compare."""
    from .demo import DemoConfig, run_demo

    cfg = DemoConfig(model=args.model, data=args.data, policy=args.policy, sparsity=args.sparsity,
                     steps=args.steps, batch=args.batch, seq=args.seq, device=args.device, out=args.out,
                     inner=args.inner, layers=args.layers, seed=args.seed, plot=not args.no_plot)
    run_demo(cfg)
    return 0


def _add_demo_parser(sub: Any) -> None:
    d = sub.add_parser("demo", help="fine-tune a small model dense and sparse, side by side (CPU, minutes)",
                       description="Fine-tune the same seeded model twice -- dense LoRA under torch.compile "
                                   "and SparseLoRA under backend='sparselora' -- and print a side-by-side table; "
                                   "writes results.json and a loss/step-time plot to --out.")
    d.add_argument("--model", help="a local Hugging Face causal-LM folder (its tokenizer via AutoTokenizer, "
                                   "local files only); default: a built-in small random Llama")
    d.add_argument("--data", help="an Alpaca-style JSON list of {instruction, input, output}; "
                                  "default: generated arithmetic word problems")
    d.add_argument("--policy", help="a policy file or preset name; default: MLP 0.9 / attention 0.5, "
                                    "first and last layer dense when there are more than 2 layers")
    d.add_argument("--sparsity", type=float, help="one sparsity for every group (overrides the policy's)")
    d.add_argument("--steps", type=int, default=30, help="training steps per side, alternating (the first compiles)")
    d.add_argument("--batch", type=int, default=8)
    d.add_argument("--seq", type=int, default=128, help="tokens per sequence (padded)")
    d.add_argument("--layers", type=int, default=2, help="layers of the built-in model")
    d.add_argument("--device", default="cpu", help="cpu or cuda")
    d.add_argument("--inner", default="inductor", choices=("inductor", "aot_eager", "eager"),
                   help="the compiler both sides lower with (default inductor)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", default="./sparselora-demo-out", help="folder for results.json and demo-loss.png")
    d.add_argument("--no-plot", action="store_true", help="write no PNG")
    d.set_defaults(func=cmd_demo)


def main(argv: Sequence[str] | None = None) -> int:
    from .models import TINY_ARCHITECTURES

    parser = argparse.ArgumentParser(prog="sparselora-fx", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="show the LoRA units, groups and sparsities the backend finds")
    p.add_argument("--model", help="a local Hugging Face model folder (built on the meta device, no weights read); "
                                   "default: a built-in tiny model")
    p.add_argument("--arch", default="llama", choices=TINY_ARCHITECTURES, help="built-in tiny architecture")
    p.add_argument("--layers", type=int, default=4, help="layers of the built-in tiny model")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-targets", default="all-linear", help="PEFT target_modules for --model")
    p.add_argument("--policy", help="a policy file or preset name")
    p.add_argument("--sparsity", type=float, help="one sparsity for every group (overrides the policy's)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_inspect)
    _add_demo_parser(sub)
    from .fidelity import add_fidelity_parser

    add_fidelity_parser(sub)
    args = parser.parse_args(argv)
    from .errors import SparseLoRAError

    try:
        return int(args.func(args))
    except SparseLoRAError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
