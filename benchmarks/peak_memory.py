"""Peak memory of one train step, dense LoRA vs SparseLoRA at MLP sparsity 0.9 (not a test).

Why a process per side: the process high-water mark (``ru_maxrss``) cannot be reset, and the
Inductor compile of the first side would pollute the second. Each side runs in a fresh
subprocess: build, compile, warm up, then one measured step. Reported per side: the peak
above the level just before the step (CPU: RSS sampled every 2 ms by a thread; CUDA:
``max_memory_allocated`` after a reset), and for reference the ``ru_maxrss`` growth across the
step (0 when the compile's peak was higher) and the final high-water mark. Saves JSON and
markdown under benchmarks/results/.

    python benchmarks/peak_memory.py                 # headline shapes, fp32, CPU
    python benchmarks/peak_memory.py --hidden 512 --layers 2 --batch 4
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--mlp", type=float, default=0.9)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--side", choices=("dense", "sparselora"), help=argparse.SUPPRESS)  # child mode
    p.add_argument("--out", default="")
    return p.parse_args(argv)


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def child(args: argparse.Namespace) -> dict:
    """Run one side in this (fresh) process and return its measurements."""
    import train_step as ts

    from sparselora_fx.demo import measure

    targs = ts.parse_args(["--dtype", args.dtype, "--device", args.device])
    inter = int(round(args.hidden * 2.75 / 16) * 16)
    cfg = {"hidden": args.hidden, "intermediate": inter, "layers": args.layers, "batch": args.batch,
           "seq": args.seq, "mlp": args.mlp, "attn": None}  # attn None: dense
    side = ts.Side(args.side, cfg, targs)
    for _ in range(args.warmup):
        side.step()
    before = _maxrss_bytes()
    with measure.PeakMemory(args.device) as peak:
        step_s = side.step()
    return {"side": args.side, "peak_above_start_bytes": peak.delta, "start_bytes": peak.start,
            "peak_bytes": peak.peak, "method": peak.method, "ru_maxrss_growth_bytes": _maxrss_bytes() - before,
            "ru_maxrss_bytes": _maxrss_bytes(), "step_s": step_s, "compile_s": side.compile_s,
            "groups": [r.counts() for r in side.reports]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.side:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return 0
    from tabulate import tabulate

    from sparselora_fx.demo import measure

    machine = measure.describe_machine(args.device)
    sides = {}
    for side in ("dense", "sparselora"):
        cmd = [sys.executable, __file__, "--side", side, "--hidden", str(args.hidden), "--layers", str(args.layers),
               "--batch", str(args.batch), "--seq", str(args.seq), "--mlp", str(args.mlp), "--dtype", args.dtype,
               "--device", args.device, "--warmup", str(args.warmup)]
        print(f"{side}: running in a fresh process ...", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            print(proc.stdout[-4000:], proc.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"the {side} process failed (exit {proc.returncode}); its output is above")
        sides[side] = json.loads(line[0][len("RESULT "):])
    mib = 2**20
    rows = [[s, f"{r['peak_above_start_bytes'] / mib:,.0f}", f"{r['peak_bytes'] / mib:,.0f}",
             f"{r['ru_maxrss_bytes'] / mib:,.0f}", f"{r['step_s']:.2f}"] for s, r in sides.items()]
    ratio = sides["sparselora"]["peak_above_start_bytes"] / max(1, sides["dense"]["peak_above_start_bytes"])
    table = tabulate(rows, headers=["side", "step peak above start (MiB)", "peak (MiB)", "ru_maxrss (MiB)", "step s"],
                     tablefmt="github")
    text = (f"# Peak memory of one train step ({args.device}, {args.dtype})\n\n"
            f"hidden {args.hidden}, {args.layers} layers, batch {args.batch} x seq {args.seq}, LoRA r16 on every "
            f"linear; SparseLoRA at MLP sparsity {args.mlp} (attention dense). Each side in its own process, "
            f"after {args.warmup} warm-up steps. Method: {sides['dense']['method']}. Machine: {machine['cpu']}, "
            f"{machine['cores']} cores, torch {machine['torch']}, load average {machine['loadavg_1_5_15']}.\n\n"
            f"{table}\n\nsparse / dense step peak: {ratio:.2f}\n")
    print(text)
    results = {"args": vars(args), "machine": machine, "sides": sides, "ratio": ratio}
    stem = Path(args.out) if args.out else RESULTS / f"peak_memory-{torch.device(args.device).type}-{args.dtype}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    stem.with_suffix(".md").write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
