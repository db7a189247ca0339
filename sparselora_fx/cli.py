"""``sparselora-fx``: ``demo`` (the main job), ``inspect`` (what the backend does to a model).

Every expected user mistake ends in one line on stderr, ``<prog>: error: <what was wrong and how
to fix it>``, and exit status 2, never a traceback: values are checked as they are parsed
(argparse ``type=`` functions below), what needs the machine or the file system (CUDA, --out,
--model, --data, --policy) right after parsing (`validate`), and the package's own errors
(`SparseLoRAError` and subclasses) that a run raises are caught in `main`. Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .errors import SparseLoRAError

PROG = "sparselora-fx"
DEVICES = ("cpu", "cuda")


class UsageError(SparseLoRAError, ValueError):
    """A command-line value that parses but cannot be used here (a folder, a file, the machine)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, ``<prog>: error: <message>``, exit status 2 (no usage block).

    Why: a wall of usage text hides the one line that says what was wrong; ``-h`` still prints it.
    Sub-parsers inherit the class (argparse makes them with ``type(parent)``).
    """

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


# ------------------------------------------------------------------------ argument types


def int_at_least(minimum: int, why: str = "", example: int | None = None) -> Callable[[str], int]:
    """An argparse ``type=``: an integer >= ``minimum``; its error names the value, the bound and an example."""
    example = minimum if example is None else example
    reason = f" ({why})" if why else ""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; give an integer >= {minimum}{reason}, "
                                             f"e.g. {example}.") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is too small: it must be >= {minimum}{reason}; "
                                             f"e.g. {example}.")
        return value

    parse.__name__ = f"int >= {minimum}"
    return parse


def sparsity(text: str) -> float:
    """An argparse ``type=``: a sparsity, the fraction of channels dropped, in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give a sparsity in [0, 1) (the fraction of "
                                         "channels dropped), e.g. 0.5.") from None
    if not 0.0 <= value < 1.0:  # NaN fails too
        raise argparse.ArgumentTypeError(f"{text} is outside [0, 1): a sparsity is the fraction of channels "
                                         "dropped (0 = dense, 0.9 = keep 10%); e.g. 0.5.")
    return value


def device(text: str) -> str:
    """An argparse ``type=``: ``cpu``, ``cuda`` or ``cuda:N`` (whether CUDA is there is `validate`'s job)."""
    name = text.strip().lower()
    kind, _, index = name.partition(":")
    if name in DEVICES or (kind == "cuda" and index.isascii() and index.isdigit()):
        return name
    raise argparse.ArgumentTypeError(f"{text!r} is not a device this runs on; use cpu or cuda (cuda:N for "
                                     "another GPU).")


def policy_name(text: str) -> str:
    """An argparse ``type=``: a non-empty policy preset name or file path (`validate` loads it)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty; give a preset name (see sparselora_fx.Policy.preset_names()) "
                                         "or a .toml/.json policy file.")
    return text


# ------------------------------------------------------------------------ environment checks


def check_device(name: str, flag: str = "--device") -> None:
    """Raise UsageError unless ``name`` (cpu, cuda, cuda:N) can be used on this machine."""
    if not name.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        why = ("this torch is a CPU-only build" if torch.version.cuda is None
               else "torch finds no usable CUDA device")
        raise UsageError(f"{flag} {name}: CUDA is not available on this machine ({why}; "
                         f"torch.cuda.is_available() is False); use {flag} cpu.")
    _, _, index = name.partition(":")
    count = torch.cuda.device_count()
    if index and int(index) >= count:
        raise UsageError(f"{flag} {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}; "
                         f"use one of them.")


def check_out_folder(path: str, flag: str = "--out") -> None:
    """Raise UsageError unless ``path`` is (or can be created as) a writable folder. Creates nothing."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"{flag} {path}: this is an existing file, not a folder; pass a folder path "
                         "(it is created if missing).")
    probe = p
    while not probe.exists():  # the nearest existing ancestor is where the folder would be made
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UsageError(f"{flag} {path}: {probe} is a file, so no folder can be made under it; "
                         "pass a folder path whose parents are folders.")
    if not _writable(probe):
        what = "folder" if probe == p else f"folder {probe}, where it would be created,"
        raise UsageError(f"{flag} {path}: the {what} is not writable; pass a folder you can write to.")


def _writable(folder: Path) -> bool:
    """Whether files can be made in ``folder`` (``os.access``: honours read-only mounts; root passes modes)."""
    return os.access(folder, os.W_OK | os.X_OK)


def check_model_folder(path: str, flag: str = "--model") -> dict[str, Any]:
    """The parsed ``config.json`` of a local Hugging Face model folder, or UsageError saying what is wrong.

    Checks, cheapest first: the folder exists and is a folder, it holds a readable, non-empty
    ``config.json`` that is a JSON object whose ``model_type`` this transformers knows.
    """
    fix = "pass a local folder saved with save_pretrained (nothing is downloaded)"
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{flag} {path}: no such folder; {fix}, or drop {flag} for the built-in model.")
    if not p.is_dir():
        raise UsageError(f"{flag} {path}: this is a file, not a folder; {fix}.")
    cfg_path = p / "config.json"
    if not cfg_path.is_file():
        raise UsageError(f"{flag} {path}: not a Hugging Face model folder (no config.json in it); {fix}, "
                         f"or drop {flag} for the built-in model.")
    try:
        text = cfg_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{flag} {path}: cannot read config.json ({exc}); re-save it with "
                         "config.save_pretrained.") from None
    if not text.strip():
        raise UsageError(f"{flag} {path}: config.json is empty; re-save it with config.save_pretrained.")
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{flag} {path}: config.json is not valid JSON (line {exc.lineno}, column {exc.colno}: "
                         f"{exc.msg}); re-save it with config.save_pretrained.") from None
    if not isinstance(config, dict):
        raise UsageError(f"{flag} {path}: config.json holds a JSON {type(config).__name__}, not an object; "
                         "re-save it with config.save_pretrained.")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise UsageError(f"{flag} {path}: config.json has no \"model_type\"; re-save it with "
                         "config.save_pretrained (which writes it).")
    import transformers as tf
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise UsageError(f"{flag} {path}: config.json has model_type {model_type!r}, which transformers "
                         f"{tf.__version__} does not know; use a folder of a supported model type (e.g. llama, "
                         "qwen2, mistral) or a transformers version that has it.")
    return config


def _load_config(path: Path, flag: str = "--model") -> Any:
    """``AutoConfig`` of a folder `check_model_folder` passed; a config transformers rejects is a UsageError."""
    import transformers as tf

    rejected: tuple[type[Exception], ...] = (OSError, ValueError, TypeError, KeyError)
    try:  # transformers 5 checks field types through huggingface_hub's strict dataclasses
        from huggingface_hub.errors import StrictDataclassError

        rejected += (StrictDataclassError,)
    except ImportError:  # pragma: no cover - older huggingface_hub
        pass
    try:
        return tf.AutoConfig.from_pretrained(path, local_files_only=True)
    except rejected as exc:
        raise UsageError(f"{flag} {path}: transformers rejects its config.json ({_one_line(exc)}); re-save it "
                         "with config.save_pretrained.") from None


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """A third-party exception's message on one line, shortened: for the middle of our own message."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


#: The built-in tiny models' position limit (models.py: max_position_embeddings / n_positions), which
#: binds the architectures with learned position embeddings (rotary ones extrapolate).
TINY_MAX_SEQ = 128
LEARNED_POSITIONS = ("gpt2", "opt", "bert")


def validate(args: argparse.Namespace) -> argparse.Namespace:
    """Checks that need the machine or the file system, run right after parsing; UsageError/PolicyError.

    Pure checks of one value live in the argparse ``type=`` functions; these come here, cheapest
    first, and create nothing (``--out`` is made by the run itself).
    """
    from .policy import Policy

    if args.policy is not None:
        Policy.coerce(args.policy)  # a missing file, bad TOML, an unknown preset: PolicyError, one line
    if args.command == "inspect":
        if args.model is not None:
            check_model_folder(args.model)
        elif args.arch in LEARNED_POSITIONS and args.seq > TINY_MAX_SEQ:
            raise UsageError(f"--seq {args.seq}: the built-in tiny {args.arch} has {TINY_MAX_SEQ} learned positions; "
                             f"use --seq {TINY_MAX_SEQ} or less (or a rotary --arch such as llama).")
    elif args.command == "demo":
        if args.data is not None:
            from .demo.data import load_alpaca_json

            load_alpaca_json(args.data)  # missing, a folder, binary, malformed, no records: DemoDataError
        if args.model is not None:
            check_model_folder(args.model)
        check_device(args.device)
        check_out_folder(args.out)
    return args


# ------------------------------------------------------------------------ commands


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
    check_model_folder(args.model)
    config = _load_config(path)
    with torch.device("meta"):  # no weights are read: an 8B folder needs no 32 GB
        if getattr(config, "is_encoder_decoder", False) or "ForSequenceClassification" in str(config.architectures):
            model = tf.AutoModelForSequenceClassification.from_config(config)
        else:
            model = tf.AutoModelForCausalLM.from_config(config)
        lora = peft.LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, target_modules=args.lora_targets)
        try:
            model = peft.get_peft_model(model, lora)
        except ValueError as exc:  # PEFT: "Target modules {...} not found in the base model"
            raise UsageError(f"--lora-targets {args.lora_targets}: PEFT cannot place LoRA on {path} "
                             f"({_one_line(exc)}); use all-linear or module names the model has.") from None
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


# ------------------------------------------------------------------------ parser


def _add_inspect_parser(sub: Any) -> None:
    from .models import TINY_ARCHITECTURES

    p = sub.add_parser("inspect", help="show the LoRA units, groups and sparsities the backend finds")
    p.add_argument("--model", help="a local Hugging Face model folder (built on the meta device, no weights read); "
                                   "default: a built-in tiny model")
    p.add_argument("--arch", default="llama", choices=TINY_ARCHITECTURES, help="built-in tiny architecture")
    p.add_argument("--layers", type=int_at_least(1, "layers of the built-in model", 4), default=4,
                   help="layers of the built-in tiny model")
    p.add_argument("--lora-rank", type=int_at_least(1, "the LoRA rank", 8), default=8)
    p.add_argument("--lora-targets", default="all-linear", help="PEFT target_modules for --model")
    p.add_argument("--policy", type=policy_name, help="a policy file or preset name")
    p.add_argument("--sparsity", type=sparsity, help="one sparsity for every group (overrides the policy's)")
    p.add_argument("--batch", type=int_at_least(1, "sequences per batch", 1), default=1)
    p.add_argument("--seq", type=int_at_least(1, "tokens per sequence", 16), default=16)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_inspect)


def _add_demo_parser(sub: Any) -> None:
    d = sub.add_parser("demo", help="fine-tune a small model dense and sparse, side by side (CPU, minutes)",
                       description="Fine-tune the same seeded model twice -- dense LoRA under torch.compile "
                                   "and SparseLoRA under backend='sparselora' -- and print a side-by-side table; "
                                   "writes results.json and a loss/step-time plot to --out.")
    d.add_argument("--model", help="a local Hugging Face causal-LM folder (its tokenizer via AutoTokenizer, "
                                   "local files only); default: a built-in small random Llama")
    d.add_argument("--data", help="an Alpaca-style JSON list of {instruction, input, output}; "
                                  "default: generated arithmetic word problems")
    d.add_argument("--policy", type=policy_name, help="a policy file or preset name; default: MLP 0.9 / "
                                                      "attention 0.5, first and last layer dense when there are "
                                                      "more than 2 layers")
    d.add_argument("--sparsity", type=sparsity, help="one sparsity for every group (overrides the policy's)")
    d.add_argument("--steps", type=int_at_least(2, "the first step compiles and is not timed", 30), default=30,
                   help="training steps per side, alternating (the first compiles)")
    d.add_argument("--batch", type=int_at_least(1, "sequences per batch", 8), default=8)
    d.add_argument("--seq", type=int_at_least(8, "tokens per padded sequence", 128), default=128,
                   help="tokens per sequence (padded)")
    d.add_argument("--layers", type=int_at_least(1, "layers of the built-in model", 2), default=2,
                   help="layers of the built-in model")
    d.add_argument("--device", type=device, default="cpu", help="cpu or cuda (cuda:N)")
    d.add_argument("--inner", default="inductor", choices=("inductor", "aot_eager", "eager"),
                   help="the compiler both sides lower with (default inductor)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", default="./sparselora-demo-out", help="folder for results.json and demo-loss.png")
    d.add_argument("--no-plot", action="store_true", help="write no PNG")
    d.set_defaults(func=cmd_demo)


def build_parser() -> ArgumentParser:
    """The ``sparselora-fx`` parser with its ``inspect`` and ``demo`` subcommands."""
    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{inspect,demo}")
    _add_inspect_parser(sub)
    _add_demo_parser(sub)
    return parser


def parse_and_validate(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` and run `validate`: the namespace, or SystemExit(2) (a bad value; one line
    printed) or a SparseLoRAError (the machine, a file or the policy; `main` prints it). Builds no model."""
    return validate(build_parser().parse_args(argv))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; the exit status: 0, or 2 with one ``error:`` line on stderr for a user mistake."""
    try:
        args = parse_and_validate(argv)
    except SystemExit as exc:  # argparse: -h (0) or a value it rejected (2, its line already printed)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except SparseLoRAError as err:
        return _report(err)
    try:
        return int(args.func(args))
    except SparseLoRAError as err:  # ours, on purpose: the message says what and how to fix it
        return _report(err)


def _report(err: SparseLoRAError) -> int:
    print(f"{PROG}: error: {err}", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
