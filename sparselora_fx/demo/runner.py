"""The demo: fine-tune one model twice, dense LoRA and SparseLoRA, and compare them side by side.

Why: the shortest honest answer to "what does the backend buy me": the same seeded model, data
and optimizer, once under ``torch.compile`` (dense LoRA) and once under
``backend="sparselora"``, timed step by step after the compile, with the executed FLOPs, the
peak memory and the losses next to each other. Eval runs dense (eager, no grad), as the method
is used. The built-in model has random weights: its loss gap says nothing about accuracy.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import SparseLoRAError
from ..policy import Policy
from . import measure
from .data import BatchStream, CharTokenizer, demo_splits, encode_dataset, load_alpaca_json

SIDES = ("dense", "sparselora")
SIDE_LABELS = {"dense": "dense LoRA", "sparselora": "SparseLoRA"}
ACCURACY_NOTE = ("note: the built-in model has random weights; its train/eval loss gap is no evidence about "
                 "accuracy. For fidelity see benchmarks/results/fidelity.md.")
PLOT_HINT = "matplotlib is not installed: no plot written. `pip install matplotlib` (or sparselora-fx[plot]) to get it."


class DemoError(SparseLoRAError, ValueError):
    """A demo option or input that cannot be used."""


@dataclass
class DemoConfig:
    """Everything one demo run depends on; defaults are the embedded demo (CPU, < 5 minutes).

    Why a dataclass: the CLI, the tests and the JSON all use one description of a run.
    ``model=None`` builds a small random Llama-family model in code (``hidden`` x
    ``intermediate``, ``heads``/``kv_heads``, ``layers``) over the shipped char tokenizer.
    ``policy=None`` uses the demo policy (MLP 0.9 / attention 0.5; first and last layer
    dense when there are more than 2 layers); ``sparsity`` overrides every group's fraction.
    ``inner`` is the compiler both sides lower with (``inductor``; tests use ``aot_eager``).
    """

    model: str | None = None
    data: str | None = None
    policy: str | None = None
    sparsity: float | None = None
    steps: int = 30
    batch: int = 8
    seq: int = 128
    lr: float = 2e-3
    lora_rank: int = 8
    device: str = "cpu"
    out: str = "./sparselora-demo-out"
    inner: str = "inductor"
    hidden: int = 256
    intermediate: int = 688
    heads: int = 4
    kv_heads: int = 2
    layers: int = 2
    n_train: int = 500
    n_eval: int = 100
    seed: int = 0
    progress: bool = True
    plot: bool = True
    sides: tuple[str, ...] = field(default=SIDES)

    def check(self) -> None:
        """Raise DemoError naming the bad option and a valid value."""
        if self.steps < 2:
            raise DemoError(f"--steps {self.steps}: need at least 2 (the first step compiles and is not timed).")
        if self.batch < 1:
            raise DemoError(f"--batch {self.batch}: need at least 1 sequence per batch, e.g. --batch 8.")
        if self.seq < 8:
            raise DemoError(f"--seq {self.seq}: need at least 8 tokens per sequence, e.g. --seq 128.")
        if self.model is None and self.layers < 1:
            raise DemoError(f"--layers {self.layers}: the built-in model needs at least 1 layer, e.g. --layers 2.")
        if self.model is not None and not (Path(self.model) / "config.json").is_file():
            raise DemoError(f"--model {self.model}: not a Hugging Face model folder (no config.json); pass a folder "
                            "saved with save_pretrained, or drop --model for the built-in model.")
        if self.inner not in ("inductor", "aot_eager", "eager"):
            raise DemoError(f"inner={self.inner!r}: choose inductor, aot_eager or eager.")
        unknown = [s for s in self.sides if s not in SIDES]
        if unknown or not self.sides:
            raise DemoError(f"sides={self.sides!r}: choose from {SIDES}.")


def demo_policy(num_layers: int) -> Policy:
    """MLP 0.9 / attention 0.5 everywhere; first and last layer dense when there are > 2 layers.

    Why: the paper's shape of policy (shallow and last layers are sensitive) at a strength a
    small model can show a speedup with; with 2 layers both are "middle" enough to keep.
    """
    data: dict[str, Any] = {"description": "sparselora-fx demo policy",
                            "defaults": {"mlp": 0.9, "attn": 0.5, "tokens": "all_sparse"}}
    if num_layers > 2:
        data["rules"] = [{"layers": [0, -1], "dense": True}]
    return Policy.from_dict(data, source="demo policy")


# ------------------------------------------------------------------------------------- set-up


def _tiny_llama(cfg: DemoConfig, vocab: int) -> torch.nn.Module:
    import transformers as tf

    config = tf.LlamaConfig(vocab_size=vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                            num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
                            num_hidden_layers=cfg.layers, max_position_embeddings=max(256, cfg.seq),
                            pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return tf.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def load_tokenizer(cfg: DemoConfig) -> Any:
    """The shipped char tokenizer, or the local model folder's own (never downloaded)."""
    if cfg.model is None:
        return CharTokenizer()
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(cfg.model, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:  # no tokenizer files, or ones transformers cannot read
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DemoError(f"--model {cfg.model}: no tokenizer could be loaded from it ({first}); save one into the "
                        "folder with tokenizer.save_pretrained, or drop --model for the built-in model.") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def build_model(cfg: DemoConfig, vocab: int) -> torch.nn.Module:
    """The seeded base model with PEFT LoRA (r = ``lora_rank``) on every linear, in train mode.

    Why seeded inside: the two sides must start from bit-identical weights.
    """
    import peft

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        if cfg.model is None:
            model = _tiny_llama(cfg, vocab)
        else:
            import transformers as tf

            path = Path(cfg.model)
            if not (path / "config.json").is_file():
                raise DemoError(f"--model {path}: not a Hugging Face model folder (no config.json); pass a folder "
                                "saved with save_pretrained, or drop --model for the built-in model.")
            model = tf.AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
        lora = peft.LoraConfig(r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank, lora_dropout=0.0,
                               target_modules="all-linear")
        model = peft.get_peft_model(model, lora)
    model.config.use_cache = False
    return model.to(cfg.device).train()


def load_data(cfg: DemoConfig, tokenizer: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Encoded train and eval sets: the generated problems, or ``--data`` split 90/10."""
    if cfg.data is None:
        train, evals = demo_splits(cfg.n_train, cfg.n_eval, cfg.seed)
    else:
        records = load_alpaca_json(cfg.data)
        n_eval = min(cfg.n_eval, max(1, len(records) // 10))
        train, evals = records[:-n_eval], records[-n_eval:]
    if len(train) < cfg.batch:  # found now, not after both sides are built and compiled
        where = f"--data {cfg.data}" if cfg.data else "the generated data"
        raise DemoError(f"{where}: {len(train)} training example(s), fewer than --batch {cfg.batch}; lower --batch "
                        "or give more data.")
    return encode_dataset(train, tokenizer, cfg.seq), encode_dataset(evals, tokenizer, cfg.seq)


def compile_side(model: torch.nn.Module, side: str, cfg: DemoConfig, policy: Policy) -> Callable[..., Any]:
    """``torch.compile`` for one side: the plain inner compiler (dense) or the sparselora backend."""
    import sparselora_fx  # noqa: F401  (registers the backend when not installed)

    if side == "dense":
        return torch.compile(model, backend=cfg.inner)
    options: dict[str, Any] = {"policy": policy, "inner": cfg.inner, "progress": False}
    if cfg.sparsity is not None:
        options["sparsity"] = cfg.sparsity
    return torch.compile(model, backend="sparselora", options=options)


@torch.no_grad()
def eval_loss(model: torch.nn.Module, data: dict[str, torch.Tensor], batch: int, device: str) -> float:
    """Mean loss per answer token over ``data``, dense and eager (how a fine-tuned model is used)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    n = data["input_ids"].shape[0]
    for start in range(0, n, batch):
        ids = data["input_ids"][start:start + batch].to(device)
        labels = data["labels"][start:start + batch].to(device)
        logits = model(input_ids=ids).logits.float()
        shift, target = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
        total += torch.nn.functional.cross_entropy(shift, target, ignore_index=-100, reduction="sum").item()
        count += int((target != -100).sum())
    model.train(was_training)
    return total / max(count, 1)


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------- training


class _Run:
    """One side's state: its seeded model, compiled callable, optimizer, batches and records."""

    def __init__(self, side: str, cfg: DemoConfig, policy: Policy, vocab: int, train: dict[str, torch.Tensor]) -> None:
        self.side, self.cfg = side, cfg
        self.model = build_model(cfg, vocab)
        self.compiled = compile_side(self.model, side, cfg, policy)
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=cfg.lr)
        self.stream = iter(BatchStream(train, cfg.batch, cfg.seed))
        self.times: list[float] = []
        self.losses: list[float] = []
        self.peak_mem = 0
        self.mem_method = ""
        self.reports: list[Any] = []

    def step(self) -> None:
        from ..backend import LAST_REPORTS

        batch = {k: v.to(self.cfg.device) for k, v in next(self.stream).items()}
        n_reports = len(LAST_REPORTS)
        with measure.PeakMemory(self.cfg.device) as peak:
            _sync(self.cfg.device)
            start = time.perf_counter()
            loss = self.compiled(**batch).loss
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            _sync(self.cfg.device)
            elapsed = time.perf_counter() - start
        if self.times:  # the compiling step's memory is the compiler's, not the step's
            self.peak_mem = max(self.peak_mem, peak.delta)
            self.mem_method = f"{peak.method}, peak above the level at the start of a step, max over steps 2+"
        if self.side == "sparselora":
            self.reports += LAST_REPORTS[n_reports:]
        self.times.append(elapsed)
        self.losses.append(float(loss.detach()))


def train_sides(cfg: DemoConfig, policy: Policy, vocab: int, train: dict[str, torch.Tensor],
                evals: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """Fine-tune every side for ``cfg.steps`` steps, alternating one step of each.

    Why interleaved: on a shared machine the load changes by the minute; alternating steps
    makes both sides see the same load, so their ratio stays honest. Each side still has its
    own model, optimizer and (identical) batch sequence. The first step of each side compiles
    and is reported apart; the median of the others extrapolates to a long run.
    """
    from tqdm.auto import tqdm

    torch._dynamo.reset()
    runs = [_Run(side, cfg, policy, vocab, train) for side in cfg.sides]
    bar = tqdm(range(cfg.steps), desc="fine-tuning (" + " | ".join(SIDE_LABELS[s] for s in cfg.sides) + ")",
               disable=not cfg.progress)
    for _ in bar:
        for run in runs:
            run.step()
        bar.set_postfix_str(" | ".join(f"{r.losses[-1]:.3f} loss {r.times[-1]:.2f}s" for r in runs))
    out: dict[str, dict[str, Any]] = {}
    for run in runs:
        stats = measure.summarize(run.times[1:])
        tail = run.losses[-min(5, len(run.losses)):]
        out[run.side] = {
            "model": run.model,
            "step_times_s": run.times,
            "losses": run.losses,
            "compile_s": run.times[0] - stats["median"],
            "step_time_s": stats,
            "tokens_per_s": cfg.batch * cfg.seq / stats["median"],
            "peak_mem_bytes": run.peak_mem,
            "peak_mem_method": run.mem_method,
            "final_train_loss": sum(tail) / len(tail),
            "eval_loss": eval_loss(run.model, evals, cfg.batch, cfg.device),
            "report": [r.counts() for r in run.reports],
            "sparsities": measure.layer_sparsities(run.reports, _num_layers(run.model)),
        }
    return out


def _num_layers(model: torch.nn.Module) -> int:
    cfg = getattr(model, "config", None)
    return int(getattr(cfg, "num_hidden_layers", 0) or 0)


def _flops(model: torch.nn.Module, cfg: DemoConfig, sparsities: list[dict[str, float | None]],
           policy: Policy) -> int | None:
    from ..flops import FlopsModelError, LayerShape

    try:
        shape = LayerShape.from_hf_config(model.config, cfg.lora_rank)
    except FlopsModelError:
        return None
    estimators = {kind: policy.estimator_for(kind) for kind in ("mlp", "attn_qk", "attn_vo")}
    return measure.step_flops(shape, cfg.batch, cfg.seq, sparsities, estimators)


# ------------------------------------------------------------------------------------- outputs


def _fmt_bytes(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.0f} MiB"


def _fmt_flops(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 1e9:,.2f} GFLOP"


#: Below this many timed steps per side (the first step compiles and is not timed) a median is one
#: or two samples on a shared machine: the speedup is then reported as not meaningful, not printed.
MIN_TIMED_STEPS = 5


def speedup_figures(dense: dict[str, Any], sparse: dict[str, Any], *,
                    min_timed: int = MIN_TIMED_STEPS) -> tuple[dict[str, float], str | None]:
    """The speedup, its FLOPs ideal and efficiency of two sides' results; or none, and why not.

    Why a gate: ``--steps 2`` once printed "18.19x speedup, efficiency 9.15" from one timed step.
    """
    timed = min(len(dense["step_times_s"]), len(sparse["step_times_s"])) - 1
    if timed < min_timed:
        return {}, (f"timing: only {max(timed, 0)} timed step(s) per side (the first compiles), fewer than "
                    f"{min_timed}: the speedup and efficiency figures would not be meaningful, so none are "
                    f"given; run with --steps {min_timed + 1} or more to measure them.")
    figures = {"speedup": dense["step_time_s"]["median"] / sparse["step_time_s"]["median"],
               "speedup_fastest_steps": dense["step_time_s"]["min"] / sparse["step_time_s"]["min"]}
    if dense.get("flops_per_step") and sparse.get("flops_per_step"):
        figures["ideal_speedup"] = dense["flops_per_step"] / sparse["flops_per_step"]
        figures["efficiency"] = figures["speedup"] / figures["ideal_speedup"]
    return figures, None


def results_table(results: dict[str, Any]) -> str:
    """The side-by-side table (tabulate) of a results dict as ``run_demo`` returns it."""
    from tabulate import tabulate

    sides = [s for s in SIDES if s in results["sides"]]
    r = {s: results["sides"][s] for s in sides}
    base = r.get("dense")

    def row(name: str, fn: Callable[[dict[str, Any]], str]) -> list[str]:
        return [name] + [fn(r[s]) for s in sides]

    rows = [
        row("median step time", lambda x: f"{x['step_time_s']['median']:.3f} s "
                                          f"({x['step_time_s']['min']:.3f}-{x['step_time_s']['max']:.3f})"),
        row("tokens/s", lambda x: f"{x['tokens_per_s']:,.0f}"),
        row("speedup", lambda x: f"{base['step_time_s']['median'] / x['step_time_s']['median']:.2f}x"
            if base and "speedup" in results else "n/a"),
        row("executed FLOPs / step", lambda x: _fmt_flops(x.get("flops_per_step"))),
        row("compile (first step extra)", lambda x: f"{x['compile_s']:.1f} s"),
        row("peak memory (step)", lambda x: _fmt_bytes(x["peak_mem_bytes"])),
        row("final train loss", lambda x: f"{x['final_train_loss']:.4f}"),
        row("eval loss (dense)", lambda x: f"{x['eval_loss']:.4f}"),
    ]
    return tabulate(rows, headers=["", *(SIDE_LABELS[s] for s in sides)], tablefmt="github")


def write_plot(results: dict[str, Any], path: Path) -> bool:
    """Loss curves and per-step times of both sides as a PNG; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for side, res in results["sides"].items():
        steps = range(1, len(res["losses"]) + 1)
        ax1.plot(steps, res["losses"], label=SIDE_LABELS[side])
        ax2.plot(list(steps)[1:], res["step_times_s"][1:], marker=".", label=SIDE_LABELS[side])
    ax1.set(xlabel="step", ylabel="train loss (answer tokens)", title="train loss")
    ax2.set(xlabel="step", ylabel="seconds", title="step time (after the compiling step)")
    ax2.set_ylim(bottom=0)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(results.get("title", "sparselora-fx demo"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _jsonable(results: dict[str, Any]) -> dict[str, Any]:
    out = dict(results)
    out["sides"] = {s: {k: v for k, v in r.items() if k != "model"} for s, r in results["sides"].items()}
    return out


def run_demo(cfg: DemoConfig, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the demo: both sides, then the table, ``results.json`` and ``demo-loss.png`` in ``cfg.out``.

    Why one entry point: the CLI and the tests drive the same code. Returns the results dict
    (the JSON's content; each side also holds its trained ``model``).
    """
    cfg.check()
    out = Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # an existing file, a file among its parents, no write permission
        raise DemoError(f"--out {cfg.out}: cannot create the output folder ({exc.strerror or exc}); pass a "
                        "writable folder path.") from None
    tokenizer = load_tokenizer(cfg)
    vocab = len(tokenizer) if cfg.model is not None else tokenizer.vocab_size
    train, evals = load_data(cfg, tokenizer)
    policy = Policy.coerce(cfg.policy) if cfg.policy else demo_policy(cfg.layers)
    what = cfg.model or (f"built-in Llama ({cfg.layers} layers, hidden {cfg.hidden}, intermediate "
                         f"{cfg.intermediate}, {cfg.heads}/{cfg.kv_heads} heads, vocab {vocab}, random weights)")
    echo(f"model: {what}; LoRA r={cfg.lora_rank} on every linear; batch {cfg.batch} x seq {cfg.seq}; "
         f"{cfg.steps} steps per side on {cfg.device}; inner compiler {cfg.inner}")
    results: dict[str, Any] = {
        "title": f"sparselora-fx demo: {what if cfg.model else 'built-in Llama'}, {cfg.steps} steps",
        "config": {k: v for k, v in asdict(cfg).items()},
        "machine": measure.describe_machine(cfg.device),
        "policy": policy.description or str(cfg.policy),
        "token_mode": "all_sparse",
        "sides": {},
    }
    results["config"]["sides"] = list(cfg.sides)
    for side, res in train_sides(cfg, policy, vocab, train, evals).items():
        sparsities = res["sparsities"] if side == "sparselora" else [
            {"mlp": None, "attn_qk": None, "attn_vo": None}] * _num_layers(res["model"])
        res["flops_per_step"] = _flops(res["model"], cfg, sparsities, policy)
        results["sides"][side] = res
    results["notes"] = [ACCURACY_NOTE] if cfg.model is None else []
    if "dense" in results["sides"] and "sparselora" in results["sides"]:
        figures, why_not = speedup_figures(results["sides"]["dense"], results["sides"]["sparselora"])
        results.update(figures)
        if why_not:
            results["notes"].append(why_not)
    load = measure.describe_machine(cfg.device)["loadavg_1_5_15"]
    results["loadavg_after"] = load
    cores = results["machine"]["cores"] or 1
    if load and max(results["machine"]["loadavg_1_5_15"][0], load[0]) > cores:
        results["notes"].append(f"note: the machine was busy (1-min load average {load[0]:.1f} on {cores} cores): "
                                "steps alternate between the sides so both see the same load, but the spreads "
                                "in the table are wide; rerun on an idle machine for steadier numbers.")
    table = results_table(results)
    results["table"] = table
    echo("")
    echo(table)
    if "speedup" in results:
        extra = (f" of an ideal {results['ideal_speedup']:.2f}x from FLOPs (efficiency {results['efficiency']:.2f})"
                 if "ideal_speedup" in results else "")
        echo(f"\nSparseLoRA step speedup: {results['speedup']:.2f}x (medians; "
             f"{results['speedup_fastest_steps']:.2f}x between the fastest steps){extra}.")
    for note in results["notes"]:
        echo(note)
    json_path = out / "results.json"
    json_path.write_text(json.dumps(_jsonable(results), indent=2, default=_json_default) + "\n", encoding="utf-8")
    results["json_path"] = str(json_path)
    png = out / "demo-loss.png"
    if cfg.plot and write_plot(results, png):
        results["plot_path"] = str(png)
        echo(f"wrote {json_path} and {png}")
    else:
        results["plot_path"] = None
        echo(f"wrote {json_path}")
        if cfg.plot:
            echo(PLOT_HINT)
    return results


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return str(value)
