"""Train-step benchmark: dense LoRA (torch.compile, Inductor) vs SparseLoRA, side by side (not a test).

Why: the speedup claim must be measured the way users train: one process, both sides compiled,
warm-up excluded, steps interleaved (dense, sparse, dense, ...) so that load on a shared machine
hits both alike, median of >= 10 steps with the min-max spread of every timing. Each config
reports the speedup, the executed-FLOPs ratio (ideal speedup, from sparselora_fx.flops with the
sparsities the backend's report states), efficiency = speedup / ideal, the estimator's share of
a sparse step (wall time of the sparselora::select_* ops, median of 3 steps), compile times and peak
step memory. Writes JSON and a markdown table under benchmarks/results/ with the machine
(CPU model, cores, load average, torch version).

    python benchmarks/train_step.py                       # the headline config, fp32, CPU
    python benchmarks/train_step.py --dtype bf16
    python benchmarks/train_step.py --hidden 512,1024 --mlp 0.5,0.9 --steps 10

    python benchmarks/train_step.py --dense-layers 0,-1 --output-fraction 0.25   # reference-like

Every size option takes a comma-separated list; the benchmark runs their product.
`--output-fraction f` puts the labels on the last f of each sequence (the answer tokens of an
instruction set; -100 elsewhere) and runs those tokens dense (policy tokens = "output_dense", as
the reference does); 0 (the default) trains on every token and runs all of them sparse.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from sparselora_fx.demo import measure
from sparselora_fx.flops import LayerShape
from sparselora_fx.policy import Policy

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
RESULTS = Path(__file__).resolve().parent / "results"


def _ints(text: str) -> list[int]:
    return [int(x) for x in str(text).split(",") if x]


def _floats(text: str) -> list[float]:
    return [float(x) for x in str(text).split(",") if x]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line; the defaults are the headline config."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", default="1024")
    p.add_argument("--intermediate", default="", help="default: 2.75 x hidden rounded to 16 (2816 at 1024)")
    p.add_argument("--head-dim", type=int, default=128, help="q heads = hidden / head_dim, kv heads = half")
    p.add_argument("--layers", default="4")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", default="8")
    p.add_argument("--seq", default="256")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--mlp", default="0.9", help="MLP sparsity (every layer)")
    p.add_argument("--attn", default="0.5", help="attention sparsity (every layer, QK and VO)")
    p.add_argument("--dense-layers", default="", help="layer indices kept dense, e.g. 0,-1 (reference-like)")
    p.add_argument("--output-fraction", type=float, default=0.0,
                   help="labels on the last fraction of each sequence, run dense (0: all tokens sparse)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per side (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side after the compiling one")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-profile", action="store_true", help="skip the estimator-share profile")
    p.add_argument("--where", type=int, default=0, metavar="N",
                   help="also profile one step per side and report its N most expensive ops (where the time goes)")
    p.add_argument("--out", default="", help="result stem (default benchmarks/results/train_step-<device>-<dtype>)")
    return p.parse_args(argv)


def build(cfg: dict[str, Any], args: argparse.Namespace) -> torch.nn.Module:
    """A seeded random Llama with PEFT LoRA on every linear, in ``args.dtype`` on ``args.device``."""
    import peft
    import transformers as tf

    heads = max(1, cfg["hidden"] // args.head_dim)
    config = tf.LlamaConfig(vocab_size=args.vocab, hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"],
                            num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                            num_hidden_layers=cfg["layers"], max_position_embeddings=max(2048, cfg["seq"]),
                            tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
        model = peft.get_peft_model(model, peft.LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank,
                                                           target_modules="all-linear"))
    model.config.use_cache = False
    return model.to(device=args.device, dtype=DTYPES[args.dtype]).train()


def answer_tokens(cfg: dict[str, Any]) -> int:
    """Tokens per sequence that carry labels: all of them, or the last output_token_fraction."""
    f = cfg["output_token_fraction"]
    return cfg["seq"] if f <= 0 else max(1, round(f * cfg["seq"]))


def benchmark_policy(cfg: dict[str, Any]) -> Policy:
    """The config's sparsity on every layer but `dense_layers`; answer tokens dense if they exist."""
    rules = [{"layers": list(cfg["dense_layers"]), "dense": True}] if cfg["dense_layers"] else []
    data = {"description": "benchmark", "rules": rules,
            "defaults": {"mlp": cfg["mlp"], "attn": cfg["attn"], "tokens": cfg["token_mode"]}}
    if cfg["token_mode"] == "output_dense":
        data["defaults"]["dense_tokens"] = cfg["output_token_fraction"]
    return Policy.from_dict(data)


class Side:
    """One compiled model with its optimizer; ``step()`` runs and times one train step."""

    def __init__(self, name: str, cfg: dict[str, Any], args: argparse.Namespace) -> None:
        from sparselora_fx.backend import LAST_REPORTS

        self.name, self.args = name, args
        self.model = build(cfg, args)
        n = len(LAST_REPORTS)
        if name == "dense":
            self.compiled = torch.compile(self.model)
        else:
            self.compiled = torch.compile(self.model, backend="sparselora",
                                          options={"policy": benchmark_policy(cfg), "progress": False})
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, args.vocab, (cfg["batch"], cfg["seq"]), generator=g).to(args.device)
        labels = ids.clone()
        labels[:, : cfg["seq"] - answer_tokens(cfg)] = -100
        self.batch = {"input_ids": ids, "labels": labels}
        self.compile_s = self.step()
        self.reports = LAST_REPORTS[n:]

    def step(self) -> float:
        dev = torch.device(self.args.device)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = self.compiled(**self.batch).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start


def estimator_share(side: Side, steps: int = 3) -> dict[str, float]:
    """Share of a sparse step spent in the sparselora::select_* ops (scores + top-k), median of `steps`.

    CPU: the ops' own wall clock (`sparselora_fx.counters.record_selections(times=True)`, no
    profiler overhead). CUDA: the ops' launches are asynchronous, so the profiler's device time of
    the ops is used instead.
    """
    from sparselora_fx.counters import record_selections

    if torch.device(side.args.device).type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        shares, walls, sels = [], [], []
        for _ in range(steps):
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                wall = side.step()
            sel = sum(e.device_time_total for e in prof.key_averages() if e.key.startswith("sparselora::select")) / 1e6
            shares.append(sel / wall), walls.append(wall), sels.append(sel)
    else:
        shares, walls, sels, by_op = [], [], [], []
        for _ in range(steps):
            with record_selections(picks=False, times=True) as rec:
                wall = side.step()
            times = rec.times
            ops: dict[str, float] = {}
            for op, sec in times:
                ops[op] = ops.get(op, 0.0) + sec
            sel = sum(ops.values())
            shares.append(sel / wall), walls.append(wall), sels.append(sel), by_op.append(ops)
        i = sorted(range(steps), key=shares.__getitem__)[steps // 2]
        return {"select_s": sels[i], "step_s": walls[i], "share": shares[i], "shares": shares,
                "by_op_s": by_op[i]}
    i = sorted(range(steps), key=shares.__getitem__)[steps // 2]
    return {"select_s": sels[i], "step_s": walls[i], "share": shares[i], "shares": shares}


def where_time_goes(side: Side, top: int) -> list[dict[str, Any]]:
    """The `top` ops by self time over one profiled step, with their share of the step's op time."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(side.args.device).type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        side.step()
    events = [e for e in prof.key_averages() if not e.key.startswith("ProfilerStep")]
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    total = sum(getattr(e, attr) for e in events) or 1
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    return [{"op": e.key, "self_ms": getattr(e, attr) / 1e3, "share": getattr(e, attr) / total, "calls": e.count}
            for e in events[:top]]


def run_config(cfg: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Both sides of one config: compile, warm up, interleave timed steps, profile, count FLOPs."""
    torch._dynamo.reset()
    dense = Side("dense", cfg, args)
    sparse = Side("sparselora", cfg, args)
    for _ in range(args.warmup):
        dense.step()
        sparse.step()
    times: dict[str, list[float]] = {"dense": [], "sparselora": []}
    for _ in range(args.steps):
        for side in (dense, sparse):
            times[side.name].append(side.step())
    mem = {}
    for side in (dense, sparse):
        with measure.PeakMemory(args.device) as peak:
            side.step()
        mem[side.name] = peak.delta
    shape = LayerShape.from_hf_config(dense.model.config, args.lora_rank)
    sparsities = measure.layer_sparsities(sparse.reports, cfg["layers"])
    none = [{"mlp": None, "attn_qk": None, "attn_vo": None}] * cfg["layers"]
    f_out = answer_tokens(cfg) / cfg["seq"] if cfg["token_mode"] == "output_dense" else 0.0
    flops_d = measure.step_flops(shape, cfg["batch"], cfg["seq"], none)
    flops_s = measure.step_flops(shape, cfg["batch"], cfg["seq"], sparsities, f_out=f_out)
    td, ts = measure.summarize(times["dense"]), measure.summarize(times["sparselora"])
    speedup = td["median"] / ts["median"]
    ideal = flops_d / flops_s
    out = {
        "config": cfg,
        "dense": {"step_s": td, "compile_s": dense.compile_s, "flops": flops_d, "peak_step_mem_bytes": mem["dense"]},
        "sparselora": {"step_s": ts, "compile_s": sparse.compile_s, "flops": flops_s,
                       "peak_step_mem_bytes": mem["sparselora"], "report": [r.counts() for r in sparse.reports],
                       "sparsities": sparsities},
        "speedup": speedup,
        "ideal_speedup": ideal,
        "efficiency": speedup / ideal,
        "tokens_per_s": {"dense": cfg["batch"] * cfg["seq"] / td["median"],
                         "sparselora": cfg["batch"] * cfg["seq"] / ts["median"]},
        "paired_speedups": [d / s for d, s in zip(times["dense"], times["sparselora"])],
    }
    if not args.no_profile:
        out["estimator"] = estimator_share(sparse)
    if args.where:
        out["where"] = {side.name: where_time_goes(side, args.where) for side in (dense, sparse)}
    return out


def markdown(results: dict[str, Any]) -> str:
    """A markdown table of every config plus the machine description."""
    from tabulate import tabulate

    rows = []
    for r in results["runs"]:
        c = r["config"]
        d, s = r["dense"], r["sparselora"]
        rows.append([
            f"{c['hidden']}/{c['intermediate']} x{c['layers']}", f"{c['batch']}x{c['seq']}",
            f"{c['mlp']}/{c['attn']}" + (f" (layers {c['dense_layers']} dense)" if c.get("dense_layers") else ""),
            c["output_token_fraction"],
            f"{d['step_s']['median']:.3f} ({d['step_s']['min']:.3f}-{d['step_s']['max']:.3f})",
            f"{s['step_s']['median']:.3f} ({s['step_s']['min']:.3f}-{s['step_s']['max']:.3f})",
            f"{r['speedup']:.2f}x", f"{r['ideal_speedup']:.2f}x", f"{r['efficiency']:.2f}",
            f"{100 * r['estimator']['share']:.1f}%" if "estimator" in r else "-",
            f"{d['compile_s']:.0f} / {s['compile_s']:.0f}",
            f"{d['peak_step_mem_bytes'] / 2**20:.0f} / {s['peak_step_mem_bytes'] / 2**20:.0f}",
        ])
    headers = ["hidden/inter x layers", "batch x seq", "sparsity mlp/attn", "dense output tokens",
               "dense step s (min-max)", "sparse step s (min-max)", "speedup", "ideal (FLOPs)", "efficiency",
               "estimator share", "compile s d/s", "peak step MiB d/s"]
    m = results["machine"]
    head = (f"# Train-step benchmark ({results['device']}, {results['dtype']})\n\n"
            f"Machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), torch {m['torch']}"
            f"{', GPU ' + m['gpu'] if 'gpu' in m else ''}. Load average before/after (1/5/15 min): "
            f"{m['loadavg_1_5_15']} / {results['loadavg_after']} (a load before the run near the core count means other processes shared the cores; the load after includes the benchmark's own threads).\n\n"
            f"Estimators: {results['runs'][0]['config']['estimator']}.\n\n"
            f"{results['steps']} timed steps per side after {results['warmup']} warm-up steps, interleaved; "
            "median with min-max. Ideal = dense FLOPs / sparse FLOPs (sparselora_fx.flops); efficiency = "
            "speedup / ideal; estimator share = wall time of the sparselora::select_* ops over a sparse step (median of 3 steps; CUDA: profiler device time). "
            "Peak step memory: " + ("CUDA allocator peak" if results["device"].startswith("cuda") else
                                    "sampled RSS above the level before the step") + ".\n\n")
    body = tabulate(rows, headers=headers, tablefmt="github") + "\n"
    for r in results["runs"]:
        per_op = r.get("estimator", {}).get("by_op_s")
        if per_op:
            body += ("\nEstimator by op (ms per sparse step, all layers): "
                     + ", ".join(f"{op} {1e3 * sec:.1f}" for op, sec in sorted(per_op.items())) + "\n")
        for name, ops in r.get("where", {}).items():
            body += (f"\nWhere the time goes, {name}, {r['config']['hidden']} x{r['config']['layers']}, "
                     f"{r['config']['batch']}x{r['config']['seq']} (one profiled step, self time):\n\n")
            body += tabulate([[o["op"], f"{o['self_ms']:.1f}", f"{100 * o['share']:.1f}%", o["calls"]] for o in ops],
                             headers=["op", "self ms", "share", "calls"], tablefmt="github") + "\n"
    return head + body


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.steps < 10:
        print("note: fewer than 10 timed steps: the median is less trustworthy", file=sys.stderr)
    machine = measure.describe_machine(args.device)
    runs = []
    grid = itertools.product(_ints(args.hidden), _ints(args.layers), _ints(args.batch), _ints(args.seq),
                             _floats(args.mlp), _floats(args.attn))
    for hidden, layers, batch, seq, mlp, attn in grid:
        inter = _ints(args.intermediate)[0] if args.intermediate else int(round(hidden * 2.75 / 16) * 16)
        policy = Policy()
        cfg = {"hidden": hidden, "intermediate": inter, "layers": layers, "batch": batch, "seq": seq,
               "mlp": mlp, "attn": attn, "output_token_fraction": args.output_fraction,
               "token_mode": "output_dense" if args.output_fraction > 0 else "all_sparse",
               "dense_layers": _ints(args.dense_layers), "lora_rank": args.lora_rank, "vocab": args.vocab,
               "estimator": "policy defaults: " + ", ".join(
                   f"{k} {policy.estimator_for(k).describe()}" for k in ("mlp", "attn_vo", "attn_qk"))}
        print(f"config {cfg} ...", flush=True)
        r = run_config(cfg, args)
        print(f"  speedup {r['speedup']:.2f}x, ideal {r['ideal_speedup']:.2f}x, efficiency {r['efficiency']:.2f}",
              flush=True)
        runs.append(r)
    results = {"device": args.device, "dtype": args.dtype, "steps": args.steps, "warmup": args.warmup,
               "machine": machine, "loadavg_after": list(__import__("os").getloadavg()), "runs": runs}
    stem = Path(args.out) if args.out else RESULTS / f"train_step-{torch.device(args.device).type}-{args.dtype}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    md = markdown(results)
    stem.with_suffix(".md").write_text(md, encoding="utf-8")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
