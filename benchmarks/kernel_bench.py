"""Time the gather-GEMM kernels against cuBLAS on a pre-gathered weight (GPU only, not a test).

Why: the kernels exist to beat "slice the kept weight, then cuBLAS". This
script measures each kernel at LLaMA-3-8B MLP shapes (hidden 4096,
intermediate 14336, 4096 tokens, bf16) for several keep fractions against
  * cuBLAS on a weight already gathered to the kept size (the copy not timed:
    the best a slicing approach can do), and
  * gather + cuBLAS (the copy timed: what slicing costs every step),
  * the dense cuBLAS GEMM (keep = 1), for the speedup sparsity buys.
The column kernels are also timed with the optional transposed weight copy
(`w_t=`), whose memory is reported. Timing: torch.cuda.Event per call, median
of repeats, after warm-up (the first call autotunes). Prints a markdown table
and writes JSON to --out.

    python benchmarks/kernel_bench.py --out results/kernels.json

Runs in well under a minute on an H200 (autotuning compiles dominate; a warm
Triton cache or --no-autotune makes it faster). On a machine without CUDA it
only parses arguments and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line: shapes default to LLaMA-3-8B's MLP at 4096 tokens."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="kernel_bench.json", help="where to write the JSON results")
    p.add_argument("--tokens", type=int, default=4096, help="M: tokens per batch (default 4096)")
    p.add_argument("--hidden", type=int, default=4096, help="model width (default 4096)")
    p.add_argument("--intermediate", type=int, default=14336, help="MLP width (default 14336)")
    p.add_argument("--keep", default="0.5,0.25,0.1", help="comma-separated keep fractions")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per measurement (median)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first (the first autotunes)")
    p.add_argument("--no-transposed", action="store_true", help="skip the w_t= variants of the cols kernels")
    p.add_argument("--no-autotune", action="store_true", help="one fixed tile (SPARSELORA_TRITON_AUTOTUNE=0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--device",
        default="cuda",
        help="cuda (default); 'cpu' only smoke-tests this script under TRITON_INTERPRET=1 at tiny sizes",
    )
    return p.parse_args(argv)


def time_ms(fn: Callable[[], Any], warmup: int, repeats: int, cuda: bool = True) -> float:
    """Median milliseconds of `fn` on the current stream, each call bracketed by CUDA events."""
    for _ in range(warmup):
        fn()
    if not cuda:  # CPU smoke test of the script only
        times = []
        for _ in range(max(repeats, 1)):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Measure every (op, keep fraction) case; returns one record per case."""
    from sparselora_fx.runtime.kernels import gather_gemm as gg

    dtype = DTYPES[args.dtype]
    dev = torch.device(args.device)
    g = torch.Generator(device=dev).manual_seed(args.seed)
    m, h, f = args.tokens, args.hidden, args.intermediate
    # gate/up: w [f, h] (output channels sparse); down: w [h, f] (input channels sparse).
    w_up = torch.randn(f, h, device=dev, dtype=dtype, generator=g) * h**-0.5
    w_down = torch.randn(h, f, device=dev, dtype=dtype, generator=g) * f**-0.5
    x_h = torch.randn(m, h, device=dev, dtype=dtype, generator=g)
    w_down_t = None if args.no_transposed else gg.transpose_weight(w_down)
    t = lambda fn: time_ms(fn, args.warmup, args.repeats, cuda=dev.type == "cuda")  # noqa: E731

    # Dense cuBLAS (keep = 1) for each op; x_h doubles as the [M, hidden] output gradient.
    x_f = torch.randn(m, f, device=dev, dtype=dtype, generator=g)
    dense = {
        "rows_gemm": t(lambda: x_h @ w_up.T),
        "rows_gemm_dx": t(lambda: x_f @ w_up),
        "cols_gemm": t(lambda: x_f @ w_down.T),
        "cols_gemm_dx": t(lambda: x_h @ w_down),
    }
    del x_f

    records = []
    for keep in [float(v) for v in args.keep.split(",")]:
        n = max(1, round(keep * f))
        idx = torch.randperm(f, device=dev, generator=g)[:n]
        x_n = torch.randn(m, n, device=dev, dtype=dtype, generator=g)
        up_kept = w_up[idx].contiguous()
        down_kept = w_down[:, idx].contiguous()
        cases: list[tuple[str, str, int, int, Callable, Callable, Callable]] = [
            # name, variant, P (outputs), R (reduction), ours, cuBLAS on pre-gathered, gather + cuBLAS
            ("rows_gemm", "", n, h, lambda: gg.rows_gemm(x_h, w_up, idx),
             lambda: x_h @ up_kept.T, lambda: x_h @ w_up[idx].T),
            ("rows_gemm_dx", "", h, n, lambda: gg.rows_gemm_dx(x_n, w_up, idx),
             lambda: x_n @ up_kept, lambda: x_n @ w_up[idx]),
            ("cols_gemm", "", h, n, lambda: gg.cols_gemm(x_n, w_down, idx),
             lambda: x_n @ down_kept.T, lambda: x_n @ w_down[:, idx].T),
            ("cols_gemm_dx", "", n, h, lambda: gg.cols_gemm_dx(x_h, w_down, idx),
             lambda: x_h @ down_kept, lambda: x_h @ w_down[:, idx]),
        ]  # fmt: skip
        if w_down_t is not None:
            cases += [
                ("cols_gemm", "w_t", h, n, lambda: gg.cols_gemm(x_n, w_down, idx, w_t=w_down_t),
                 lambda: x_n @ down_kept.T, lambda: x_n @ w_down[:, idx].T),
                ("cols_gemm_dx", "w_t", n, h, lambda: gg.cols_gemm_dx(x_h, w_down, idx, w_t=w_down_t),
                 lambda: x_h @ down_kept, lambda: x_h @ w_down[:, idx]),
            ]  # fmt: skip
        for name, variant, p_, r_, ours, cublas, gather_cublas in cases:
            err = _rel_err(ours(), cublas())
            ms = t(ours)
            ms_cublas = t(cublas)
            ms_gather = t(gather_cublas)
            flops = 2.0 * m * p_ * r_
            records.append(
                {
                    "op": name,
                    "variant": variant or "plain",
                    "keep": keep,
                    "M": m,
                    "P": p_,
                    "R": r_,
                    "ms": ms,
                    "ms_cublas_pregathered": ms_cublas,
                    "ms_gather_plus_cublas": ms_gather,
                    "ms_dense_cublas": dense[name],
                    "tflops": flops / ms / 1e9,
                    "vs_cublas_pregathered": ms_cublas / ms,
                    "vs_gather_plus_cublas": ms_gather / ms,
                    "vs_dense": dense[name] / ms,
                    "max_rel_err_vs_cublas": err,
                }
            )
        del up_kept, down_kept, x_n
    return records


def markdown(records: list[dict[str, Any]]) -> str:
    """One markdown table row per case; ratios > 1 mean the kernel is faster."""
    head = ("op", "variant", "keep", "ms", "TFLOP/s", "cuBLAS pre-gathered ms", "x vs pre-gathered",
            "x vs gather+cuBLAS", "x vs dense", "max rel err")  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        cells = (r["op"], r["variant"], f"{r['keep']:g}", f"{r['ms']:.3f}", f"{r['tflops']:.0f}",
                 f"{r['ms_cublas_pregathered']:.3f}", f"{r['vs_cublas_pregathered']:.2f}",
                 f"{r['vs_gather_plus_cublas']:.2f}", f"{r['vs_dense']:.2f}", f"{r['max_rel_err_vs_cublas']:.1e}")  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point: exits 2 without CUDA or triton, 0 after writing the JSON."""
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("kernel_bench: needs a CUDA GPU; none found.", file=sys.stderr)
        return 2
    from sparselora_fx.runtime.kernels import HAS_TRITON

    if not HAS_TRITON:
        print("kernel_bench: needs triton (`pip install sparselora-fx[triton]`).", file=sys.stderr)
        return 2
    if args.no_autotune:
        os.environ["SPARSELORA_TRITON_AUTOTUNE"] = "0"
    torch.backends.cuda.matmul.allow_tf32 = False
    if args.device == "cuda":
        torch.cuda.set_device(0)
    records = run(args)
    import triton

    from sparselora_fx.runtime.kernels.gather_gemm import transposed_weight_bytes

    w_down_bytes = transposed_weight_bytes(torch.empty(args.hidden, args.intermediate, dtype=DTYPES[args.dtype],
                                                       device="meta"))  # fmt: skip
    result = {
        "config": vars(args),
        "env": {
            "torch": torch.__version__,
            "triton": triton.__version__,
            "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
            "python": platform.python_version(),
        },
        "transposed_weight_bytes_per_down_proj": w_down_bytes,
        "records": records,
    }
    print(markdown(records))
    print(f"\nw_t copy of one down_proj weight: {w_down_bytes / 2**20:.0f} MiB")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
