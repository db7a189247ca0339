"""One-call GPU check: kernel correctness, per-op timing, full train steps (not a test).

Why one script: the H200 is lent for minutes, once. This runs everything the GPU path needs
in a single call, each phase time-boxed so that a slow phase skips the later ones with a note
instead of losing the run:

1. kernels: every gather-GEMM kernel (rows_gemm [+bias, +scatter], cols_gemm [+bias, w_t=],
   rows_gemm_dx, cols_gemm_dx [w_t=]) and every sparselora custom op, in bf16, fp16 and fp32,
   at awkward sizes, against a float64 reference; outputs are poisoned with NaN first, so an
   unwritten element fails.
2. ops: per-op time at LLaMA-3-8B width (hidden 4096, intermediate 14336, 8*512 tokens, bf16)
   at the keep counts of the math10k policy (MLP sparsity 0.99 -> 143 of 14336 channels,
   attention 0.75): our kernel vs cuBLAS on the pre-gathered weight (the best slicing can do),
   vs gather + cuBLAS (what slicing costs each step), vs the dense GEMM. GPU time from CUDA
   graph replays (no launch gaps), plus host-inclusive time of back-to-back calls.
3. train: a 4-layer LLaMA-3-8B-width model from config, random bf16 weights, PEFT LoRA r=16
   on every linear, batch 8 x 512; three sides: dense LoRA under torch.compile (Inductor),
   sparselora with index_select + cuBLAS (SPARSELORA_DISABLE_TRITON=1, set around every step of
   that side, its compile included), sparselora with our kernels. Steps are interleaved, median of
   >= 10 after warm-up. The path is fixed when a graph compiles (on CUDA the kernels go into
   Inductor's code, passes/lower.py), so each sparse side compiles its own model; the switches
   are part of the compile-cache key, so a cached compile made under other switches is not reused.
   Each side records which path ran, read from the code Inductor generated or loaded from its cache
   for it and from the kernel-wrapper calls of one step: `triton_op` (kernel in the compiled code),
   `extern` (opaque op whose eager body launches the kernel; SPARSELORA_TRITON_LOWERING=0) or
   `torch` (index_select + mm). Ideals: FLOPs (sparselora_fx.flops) and time
   (dense step - time of the GEMMs that go sparse + cuBLAS time of the same GEMMs on
   pre-gathered weights, each measured alone); efficiency = speedup / ideal, against the
   paper's 0.73 (1.6x measured / 2.2x FLOPs).

Writes gpu_check.json and gpu_check.md under --out (default: $OUT, else benchmarks/results/),
rewritten after every phase. Prints a markdown table last.

    PYTHONUNBUFFERED=1 python benchmarks/gpu_check.py --out $OUT      # the device, ~3-5 min
    python benchmarks/gpu_check.py --smoke --out /tmp/gc               # CPU, tiny, < 60 s

--smoke runs the same code on CPU at tiny sizes: the kernels under the Triton interpreter
(TRITON_INTERPRET=1), the train step with inner compiler aot_eager. Exit status: 0 when every
check that ran passed, 1 when a correctness check failed, 2 without CUDA (and no --smoke).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the device machine runs from a copy of the tree, not installed
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: ||out - ref|| / ||ref|| limits against float64 (METHOD: fp32 far under 1e-3, tf32 ~3e-4, bf16 1e-3..1e-2).
TOLERANCE = {"fp32": 1e-5, "tf32": 2e-3, "fp16": 2e-3, "bf16": 1e-2}
PAPER_EFFICIENCY = 0.73  # 1.6x measured / 2.2x FLOPs-ideal, LLaMA-3-8B Math10K
DISABLE_ENV = "SPARSELORA_DISABLE_TRITON"
KERNEL_NAMES = ("rows_gemm", "cols_gemm", "rows_gemm_dx", "cols_gemm_dx")

# Full size (the device) and --smoke size (CPU). Heads: q heads = hidden / head_dim.
FULL = dict(hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128, layers=4, vocab=16384,
            batch=8, seq=512, lora_rank=16, mlp=0.99, attn=0.75, estimator_rank=8)
SMOKE = dict(hidden=64, intermediate=256, heads=4, kv_heads=2, head_dim=16, layers=1, vocab=128,
             batch=2, seq=16, lora_rank=4, mlp=0.99, attn=0.75, estimator_rank=4)


# --------------------------------------------------------------------------- arguments, budget


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line; sizes are fixed by the issue (FULL) or tiny (--smoke)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="", help="output folder (default: $OUT, else benchmarks/results/)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (interpreter, aot_eager)")
    p.add_argument("--budget-s", type=float, default=0.0, help="whole-run budget (default 300 s; smoke 100 s)")
    p.add_argument("--steps", type=int, default=0, help="timed train steps per side (default 12; smoke 3)")
    p.add_argument("--warmup", type=int, default=0, help="untimed steps per side after compiling (default 2; smoke 1)")
    p.add_argument("--phases", default="env,kernels,ops,train", help="comma-separated subset to run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cudagraphs", action="store_true",
                   help="two more train sides on CUDA: dense and our kernels under CUDA graphs (reduce-overhead)")
    args = p.parse_args(argv)
    args.budget_s = args.budget_s or (100.0 if args.smoke else 300.0)
    args.steps = args.steps or (3 if args.smoke else 12)
    args.warmup = args.warmup or (1 if args.smoke else 2)
    args.out = args.out or os.environ.get("OUT") or str(ROOT / "benchmarks" / "results")
    return args


class Budget:
    """Wall-clock budget of the whole run; phases ask before starting work they cannot stop."""

    def __init__(self, total_s: float) -> None:
        self.t0, self.total = time.monotonic(), total_s

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.total - self.elapsed()


# --------------------------------------------------------------------------- timing


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_gpu_us(fn: Callable[[], Any], dev: torch.device, inner: int = 10, reps: int = 15) -> dict[str, Any]:
    """Microseconds per call of `fn`: CUDA-graph replays of `inner` calls (pure GPU time).

    Falls back to CUDA events around back-to-back calls when capture fails, and to
    perf_counter on CPU; `method` says which.
    """
    if dev.type != "cuda":  # the --smoke run: the interpreter is slow, two timed calls do
        fn()
        ts = []
        for _ in range(2):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e6)
        return {"us": statistics.median(ts), "method": "cpu perf_counter"}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(inner):
                fn()
        run, method = graph.replay, "cuda graph replay"
    except Exception as err:  # capture refused (a sync inside fn): time launches instead
        torch.cuda.synchronize()
        run, method = (lambda: [fn() for _ in range(inner)]), f"events, graph capture failed: {type(err).__name__}"
    run()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / inner)
    return {"us": statistics.median(ts), "min_us": min(ts), "max_us": max(ts), "method": method}


def time_host_us(fn: Callable[[], Any], dev: torch.device, inner: int = 10, reps: int = 7) -> float:
    """Microseconds per call of back-to-back launches, host overhead included (what a step pays)."""
    if dev.type != "cuda":
        inner, reps = 1, 2
    fn()
    _sync(dev)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        _sync(dev)
        ts.append((time.perf_counter() - t0) * 1e6 / inner)
    return statistics.median(ts)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; inf when out has a NaN/inf (an unwritten element)."""
    o, r = out.detach().to(torch.float64), ref.detach().to(torch.float64)
    if not bool(torch.isfinite(o).all()):
        return math.inf
    den = float(torch.linalg.vector_norm(r))
    return float(torch.linalg.vector_norm(o - r)) / (den if den > 0 else 1.0)


def poisoned(shape: tuple[int, ...], dtype: torch.dtype, dev: torch.device) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=dev)


# --------------------------------------------------------------------------- phase 0: env


def phase_env(args: argparse.Namespace, dev: torch.device, res: dict[str, Any], budget: Budget) -> None:
    """Versions, the device, and the two ceilings (bf16 matmul rate, copy bandwidth) on random data."""
    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "device": str(dev), "platform": platform.platform()}
    for name in ("triton", "transformers", "peft", "numpy"):
        try:
            env[name] = __import__(name).__version__
        except Exception as err:  # absent or broken: record, do not fail
            env[name] = f"unavailable ({type(err).__name__})"
    from sparselora_fx.runtime import kernels

    env["has_triton"] = kernels.HAS_TRITON
    env["compiled_path"] = _compiled_path(dev)
    env["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "")
    if dev.type == "cuda":
        prop = torch.cuda.get_device_properties(dev)
        free, total = torch.cuda.mem_get_info(dev)
        env.update(gpu=prop.name, sm_count=prop.multi_processor_count, capability=f"{prop.major}.{prop.minor}",
                   mem_total_gib=total / 2**30, mem_free_gib=free / 2**30,
                   l2_mib=getattr(prop, "L2_cache_size", 0) / 2**20)
        n = 8192
        g = torch.Generator(device=dev).manual_seed(args.seed)
        a = torch.randn(n, n, device=dev, dtype=torch.bfloat16, generator=g)
        b = torch.randn(n, n, device=dev, dtype=torch.bfloat16, generator=g)
        t = time_gpu_us(lambda: a @ b, dev, inner=5, reps=5)["us"]
        env["ceiling_bf16_matmul_tflops"] = 2 * n**3 / t / 1e6
        src = torch.randn(2**28, device=dev, dtype=torch.float32, generator=g)  # 1 GiB
        dst = torch.empty_like(src)
        t = time_gpu_us(lambda: dst.copy_(src), dev, inner=3, reps=5)["us"]
        env["ceiling_copy_tb_s"] = 2 * src.numel() * 4 / t / 1e6
        del a, b, src, dst
        torch.cuda.empty_cache()
    res["env"] = env


# --------------------------------------------------------------------------- phase 1: kernels


def _kernel_cases(gg: Any, dev: torch.device, dtype: torch.dtype, m: int, k: int, n_full: int, n: int,
                  g: torch.Generator) -> Iterator[tuple[str, Callable[[], torch.Tensor], torch.Tensor, Any]]:
    """(name, run, float64 reference, extra check) for every kernel variant at one size."""
    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=dev, dtype=torch.float32, generator=g).to(dtype)

    x, w = rnd(m, k), rnd(n_full, k) * k**-0.5
    bias = rnd(n_full)
    idx_out = torch.sort(torch.randperm(n_full, device=dev, generator=g)[:n]).values
    idx_in = torch.randperm(k, device=dev, generator=g)[:n]  # unsorted on purpose: the ops need no order
    x_n, dy, dy_n = rnd(m, n), rnd(m, n_full), rnd(m, n)
    w_t = gg.transpose_weight(w)
    d = lambda t: t.to(torch.float64)  # noqa: E731
    ref_rows = d(x) @ d(w[idx_out]).T
    scat = torch.zeros(m, n_full, dtype=torch.float64, device=dev)
    scat[:, idx_out] = ref_rows + d(bias[idx_out])

    def zeros_outside(out: torch.Tensor) -> bool:
        mask = torch.ones(n_full, dtype=torch.bool, device=dev)
        mask[idx_out] = False
        return bool((out[:, mask] == 0).all())

    def run(fn: Callable[..., torch.Tensor], shape: tuple[int, int], *a: Any, **kw: Any) -> Callable[[], torch.Tensor]:
        return lambda: fn(*a, out=poisoned(shape, dtype, dev), **kw)

    yield "rows_gemm", run(gg.rows_gemm, (m, n), x, w, idx_out), ref_rows, None
    yield "rows_gemm+bias", run(gg.rows_gemm, (m, n), x, w, idx_out, bias), ref_rows + d(bias[idx_out]), None
    yield "rows_gemm+bias+scatter", run(gg.rows_gemm, (m, n_full), x, w, idx_out, bias, True), scat, zeros_outside
    # cols: w [n_full, k] read at input columns idx_in; x_n holds the kept inputs.
    ref_cols = d(x_n) @ d(w[:, idx_in]).T
    yield "cols_gemm", run(gg.cols_gemm, (m, n_full), x_n, w, idx_in), ref_cols, None
    yield "cols_gemm+bias", run(gg.cols_gemm, (m, n_full), x_n, w, idx_in, bias=bias), ref_cols + d(bias), None
    yield "cols_gemm w_t", run(gg.cols_gemm, (m, n_full), x_n, w, idx_in, w_t=w_t), ref_cols, None
    yield "rows_gemm_dx", run(gg.rows_gemm_dx, (m, k), dy_n, w, idx_out), d(dy_n) @ d(w[idx_out]), None
    ref_cdx = d(dy) @ d(w[:, idx_in])
    yield "cols_gemm_dx", run(gg.cols_gemm_dx, (m, n), dy, w, idx_in), ref_cdx, None
    yield "cols_gemm_dx w_t", run(gg.cols_gemm_dx, (m, n), dy, w, idx_in, w_t=w_t), ref_cdx, None
    if dtype == torch.float32:  # the matrix units' fp32 mode, opt-in
        yield "rows_gemm tf32", run(gg.rows_gemm, (m, n), x, w, idx_out, allow_tf32=True), ref_rows, "tf32"


def _op_cases(dev: torch.device, dtype: torch.dtype, g: torch.Generator
              ) -> Iterator[tuple[str, Callable[[], torch.Tensor], torch.Tensor, Any]]:
    """The six sparselora custom ops on 3-D inputs (what the compiled graph calls), vs float64."""
    from sparselora_fx.runtime import ops

    b, s, k, n_full, n = 2, 19, 70, 53, 19
    rnd = lambda *sh: torch.randn(*sh, device=dev, dtype=torch.float32, generator=g).to(dtype)  # noqa: E731
    x, w, bias = rnd(b, s, k), rnd(n_full, k) * k**-0.5, rnd(n_full)
    idx_o = torch.sort(torch.randperm(n_full, device=dev, generator=g)[:n]).values
    idx_i = torch.sort(torch.randperm(k, device=dev, generator=g)[:n]).values
    x_n, dy, dy_n = rnd(b, s, n), rnd(b, s, n_full), rnd(b, s, n)
    d = lambda t: t.to(torch.float64)  # noqa: E731
    rows = d(x) @ d(w[idx_o]).T + d(bias[idx_o])
    scat = torch.zeros(b, s, n_full, dtype=torch.float64, device=dev)
    scat[..., idx_o] = rows
    yield "op rows_linear", lambda: ops.rows_linear(x, w, idx_o, bias), rows, None
    yield "op rows_linear_scatter", lambda: ops.rows_linear_scatter(x, w, idx_o, bias), scat, None
    yield "op cols_linear", lambda: ops.cols_linear(x_n, w, idx_i), d(x_n) @ d(w[:, idx_i]).T, None
    yield ("op cols_linear_gather", lambda: ops.cols_linear_gather(x, w, idx_i),
           d(x[..., idx_i]) @ d(w[:, idx_i]).T, None)
    yield "op rows_linear_dx", lambda: ops.rows_linear_dx(dy_n, w, idx_o, k), d(dy_n) @ d(w[idx_o]), None
    yield "op cols_linear_dx", lambda: ops.cols_linear_dx(dy, w, idx_i), d(dy) @ d(w[:, idx_i]), None


def phase_kernels(args: argparse.Namespace, dev: torch.device, res: dict[str, Any], budget: Budget,
                  deadline: float) -> str:
    """Correctness of every kernel and op vs float64 at awkward sizes; returns a note when cut short."""
    from sparselora_fx.runtime.kernels import gather_gemm as gg

    records: list[dict[str, Any]] = res.setdefault("kernels", [])
    g = torch.Generator(device=dev).manual_seed(args.seed + 1)
    # One tile per kernel variant here (no autotuning): ~40 variants x 6 candidate tiles would be
    # compiled otherwise, minutes of a 5-minute run. The ops phase autotunes over the Hopper tiles
    # in bf16 at LLaMA sizes and checks the winning tile's output against float64; the other tiles
    # are checked only where they win (a gap: an autotuned case at awkward sizes would close it).
    old_autotune = os.environ.get(gg.AUTOTUNE_ENV)
    os.environ[gg.AUTOTUNE_ENV] = "0"
    try:
        return _kernel_checks(args, dev, records, budget, deadline, g, gg)
    finally:
        if old_autotune is None:
            os.environ.pop(gg.AUTOTUNE_ENV, None)
        else:
            os.environ[gg.AUTOTUNE_ENV] = old_autotune


def _kernel_checks(args: argparse.Namespace, dev: torch.device, records: list[dict[str, Any]], budget: Budget,
                   deadline: float, g: torch.Generator, gg: Any) -> str:
    # Awkward: no dimension a multiple of any tile (M=37, and M=257 in bf16: masks on every edge).
    sizes = [(37, 70, 53, 19), (257, 200, 517, 131)] if not args.smoke else [(37, 70, 53, 19)]
    plan = [(name, size) for name in ("bf16", "fp16", "fp32") for size in sizes[:1]]
    plan += [("bf16", size) for size in sizes[1:]]
    for dname, (m, k, n_full, n) in plan:
        dtype = DTYPES[dname]
        cases = list(_kernel_cases(gg, dev, dtype, m, k, n_full, n, g))
        if (m, k, n_full, n) == sizes[0] and (dname == "bf16" or not args.smoke):
            cases += list(_op_cases(dev, dtype, g))
        for name, run, ref, extra in cases:
            if budget.elapsed() > deadline:
                return f"cut at the phase's time box before {dname} {name} M={m}"
            t0 = time.monotonic()
            try:
                out = run()
                _sync(dev)
                err = rel_err(out, ref)
                tol = TOLERANCE["tf32" if extra == "tf32" else dname]
                zeros_ok = extra(out) if callable(extra) else True
                rec = {"case": name, "dtype": dname, "M": m, "K": k, "N": n_full, "n": n, "rel_err": err,
                       "tol": tol, "written": math.isfinite(err), "zeros_outside_idx": zeros_ok,
                       "passed": bool(err <= tol and zeros_ok)}
            except Exception as e:  # record and go on: one broken kernel must not hide the others
                rec = {"case": name, "dtype": dname, "M": m, "K": k, "N": n_full, "n": n, "passed": False,
                       "error": f"{type(e).__name__}: {e}"[:400]}
            rec["path"] = "triton" if not name.startswith("op ") else _op_path(dev, dtype)
            rec["tile"] = "interpreter" if dev.type != "cuda" else "default (autotune off)"
            rec["seconds"] = time.monotonic() - t0
            records.append(rec)
    return ""


def _compiled_path(dev: torch.device) -> str:
    """What a compiled graph on `dev` will run for the ops now: triton_op, extern (kernel) or torch."""
    from sparselora_fx.passes import lower as lowering  # noqa: F401 - registers the Triton lowering
    from sparselora_fx.runtime import kernels, ops  # noqa: F401

    if lowering.is_registered() and kernels.lowering_enabled(dev):
        return "triton_op"
    return "extern" if kernels.kernels_enabled(dev) else "torch"


def _op_path(dev: torch.device, dtype: torch.dtype) -> str:
    from sparselora_fx.runtime import ops

    return "triton" if ops._kernels_for(dev, dtype) is not None else "torch"


# --------------------------------------------------------------------------- shapes


def keep_counts(cfg: dict[str, Any]) -> dict[str, int]:
    """Kept channels per projection for the policy (what the plan computes; checked against the report)."""
    from sparselora_fx.runtime.selection import keep_count

    nh, nkv, hd = cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    pairs = keep_count(hd // 2, cfg["attn"])  # Q/K keep whole RoPE pairs per head
    kv = keep_count(nkv * hd, cfg["attn"])
    return {"mlp": keep_count(cfg["intermediate"], cfg["mlp"]), "q": nh * 2 * pairs, "k": nkv * 2 * pairs,
            "v": kv, "o": kv * (nh // nkv)}


def sparse_gemms(cfg: dict[str, Any], keep: dict[str, int]) -> list[dict[str, Any]]:
    """Every frozen-weight GEMM of one step that the policy makes sparse, dense and kept shapes.

    kind "fwd": linear(x[M, in], W[out, in]); kind "dx": dy[M, out] @ W[out, in]. Layer 0's
    q/k/v have no dX (the frozen embeddings need no gradient). `count` is per step.
    """
    h, i, q, kv, layers = cfg["hidden"], cfg["intermediate"], cfg["heads"] * cfg["head_dim"], \
        cfg["kv_heads"] * cfg["head_dim"], cfg["layers"]
    out = []
    for name, (o_full, i_full), (o_kept, i_kept), n_dx in (
        ("q", (q, h), (keep["q"], h), layers - 1),
        ("k", (kv, h), (keep["k"], h), layers - 1),
        ("v", (kv, h), (keep["v"], h), layers - 1),
        ("o", (h, q), (h, keep["o"]), layers),
        ("gate/up", (i, h), (keep["mlp"], h), 2 * layers),
        ("down", (h, i), (h, keep["mlp"]), layers),
    ):
        fwd_count = 2 * layers if name == "gate/up" else layers
        out.append({"proj": name, "kind": "fwd", "dense": (o_full, i_full), "kept": (o_kept, i_kept), "count": fwd_count})
        out.append({"proj": name, "kind": "dx", "dense": (o_full, i_full), "kept": (o_kept, i_kept), "count": n_dx})
    return out


def time_cublas_gemm(m: int, out_f: int, in_f: int, kind: str, dtype: torch.dtype, dev: torch.device,
                     g: torch.Generator) -> float:
    """GPU microseconds of one cuBLAS GEMM as autograd issues it (linear forward or dX = dy @ W)."""
    w = torch.randn(out_f, in_f, device=dev, dtype=dtype, generator=g)
    if kind == "fwd":
        x = torch.randn(m, in_f, device=dev, dtype=dtype, generator=g)
        return time_gpu_us(lambda: torch.nn.functional.linear(x, w), dev)["us"]
    dy = torch.randn(m, out_f, device=dev, dtype=dtype, generator=g)
    return time_gpu_us(lambda: dy @ w, dev)["us"]


# --------------------------------------------------------------------------- phase 2: ops


def phase_ops(args: argparse.Namespace, cfg: dict[str, Any], dev: torch.device, res: dict[str, Any],
              budget: Budget, deadline: float) -> str:
    """Per-op time of each kernel at the policy's keep counts vs cuBLAS (pre-gathered, gather+, dense)."""
    from sparselora_fx.passes import lower as _lower  # noqa: F401 - registers the triton_ops
    from sparselora_fx.runtime.kernels import gather_gemm as gg

    sl = torch.ops.sparselora  # *_triton: the bodies the compiled CUDA graph runs
    dtype = torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(args.seed + 2)
    m = cfg["batch"] * cfg["seq"]
    keep = keep_counts(cfg)
    h, inter = cfg["hidden"], cfg["intermediate"]
    q, kvw = cfg["heads"] * cfg["head_dim"], cfg["kv_heads"] * cfg["head_dim"]
    rnd = lambda *sh: torch.randn(*sh, device=dev, dtype=dtype, generator=g)  # noqa: E731
    w_up, w_down, w_q, w_k, w_o = rnd(inter, h) * h**-0.5, rnd(h, inter) * inter**-0.5, rnd(q, h) * h**-0.5, \
        rnd(kvw, h) * h**-0.5, rnd(h, q) * q**-0.5
    sel = lambda full, n: torch.sort(torch.randperm(full, device=dev, generator=g)[:n]).values  # noqa: E731
    i_mlp, i_q, i_kv, i_o = sel(inter, keep["mlp"]), sel(q, keep["q"]), sel(kvw, keep["k"]), sel(q, keep["o"])
    x, dy = rnd(m, h), rnd(m, h)
    x_mlp, x_q, x_kv = rnd(m, keep["mlp"]), rnd(m, keep["q"]), rnd(m, keep["k"])
    w_down_t = gg.transpose_weight(w_down)
    lin = torch.nn.functional.linear
    x_i, x_qf, x_kvf = rnd(m, inter), rnd(m, q), rnd(m, kvw)  # full-width inputs of the dense GEMMs
    # name, output shape, ours(out), (A, pre-gathered W, linear|mm), gather + cuBLAS, dense cuBLAS
    cases = [
        ("gate/up fwd rows_gemm", (m, keep["mlp"]), lambda o: gg.rows_gemm(x, w_up, i_mlp, out=o),
         (x, w_up[i_mlp].contiguous(), "lin"), lambda: lin(x, w_up[i_mlp]), lambda: lin(x, w_up)),
        ("down fwd cols_gemm", (m, h), lambda o: gg.cols_gemm(x_mlp, w_down, i_mlp, out=o),
         (x_mlp, w_down[:, i_mlp].contiguous(), "lin"), lambda: lin(x_mlp, w_down[:, i_mlp]),
         lambda: lin(x_i, w_down)),
        ("down fwd cols_gemm w_t", (m, h), lambda o: gg.cols_gemm(x_mlp, w_down, i_mlp, w_t=w_down_t, out=o),
         (x_mlp, w_down[:, i_mlp].contiguous(), "lin"), lambda: lin(x_mlp, w_down[:, i_mlp]),
         lambda: lin(x_i, w_down)),
        ("down fwd compiled (kept-column copy + kernel)", (m, h), lambda o: sl.cols_linear_triton(x_mlp, w_down, i_mlp),
         (x_mlp, w_down[:, i_mlp].contiguous(), "lin"), lambda: lin(x_mlp, w_down[:, i_mlp]),
         lambda: lin(x_i, w_down)),
        ("gate/up dX rows_gemm_dx", (m, h), lambda o: gg.rows_gemm_dx(x_mlp, w_up, i_mlp, out=o),
         (x_mlp, w_up[i_mlp].contiguous(), "mm"), lambda: x_mlp @ w_up[i_mlp], lambda: x_i @ w_up),
        ("down dX cols_gemm_dx", (m, keep["mlp"]), lambda o: gg.cols_gemm_dx(dy, w_down, i_mlp, out=o),
         (dy, w_down[:, i_mlp].contiguous(), "mm"), lambda: dy @ w_down[:, i_mlp], lambda: dy @ w_down),
        ("down dX cols_gemm_dx w_t", (m, keep["mlp"]),
         lambda o: gg.cols_gemm_dx(dy, w_down, i_mlp, w_t=w_down_t, out=o),
         (dy, w_down[:, i_mlp].contiguous(), "mm"), lambda: dy @ w_down[:, i_mlp], lambda: dy @ w_down),
        ("down dX compiled (kept-column copy + kernel)", (m, keep["mlp"]),
         lambda o: sl.cols_linear_dx_triton(dy, w_down, i_mlp),
         (dy, w_down[:, i_mlp].contiguous(), "mm"), lambda: dy @ w_down[:, i_mlp], lambda: dy @ w_down),
        ("q fwd rows_gemm scatter", (m, q), lambda o: gg.rows_gemm(x, w_q, i_q, scatter=True, out=o),
         (x, w_q[i_q].contiguous(), "lin"), lambda: x.new_zeros(m, q).index_copy_(1, i_q, lin(x, w_q[i_q])),
         lambda: lin(x, w_q)),
        ("k/v fwd rows_gemm scatter", (m, kvw), lambda o: gg.rows_gemm(x, w_k, i_kv, scatter=True, out=o),
         (x, w_k[i_kv].contiguous(), "lin"), lambda: x.new_zeros(m, kvw).index_copy_(1, i_kv, lin(x, w_k[i_kv])),
         lambda: lin(x, w_k)),
        ("o fwd cols_gemm", (m, h), lambda o: gg.cols_gemm(x_q, w_o, i_o, out=o),
         (x_q, w_o[:, i_o].contiguous(), "lin"), lambda: lin(x_q, w_o[:, i_o]), lambda: lin(x_qf, w_o)),
        ("o fwd compiled (kept-column copy + kernel)", (m, h), lambda o: sl.cols_linear_triton(x_q, w_o, i_o),
         (x_q, w_o[:, i_o].contiguous(), "lin"), lambda: lin(x_q, w_o[:, i_o]), lambda: lin(x_qf, w_o)),
        ("q dX rows_gemm_dx", (m, h), lambda o: gg.rows_gemm_dx(x_q, w_q, i_q, out=o),
         (x_q, w_q[i_q].contiguous(), "mm"), lambda: x_q @ w_q[i_q], lambda: x_qf @ w_q),
        ("k/v dX rows_gemm_dx", (m, h), lambda o: gg.rows_gemm_dx(x_kv, w_k, i_kv, out=o),
         (x_kv, w_k[i_kv].contiguous(), "mm"), lambda: x_kv @ w_k[i_kv], lambda: x_kvf @ w_k),
        ("o dX cols_gemm_dx", (m, keep["o"]), lambda o: gg.cols_gemm_dx(dy, w_o, i_o, out=o),
         (dy, w_o[:, i_o].contiguous(), "mm"), lambda: dy @ w_o[:, i_o], lambda: dy @ w_o),
    ]
    cases.append(("o dX compiled (kept-column copy + kernel)", (m, keep["o"]),
                  lambda o: sl.cols_linear_dx_triton(dy, w_o, i_o),
                  (dy, w_o[:, i_o].contiguous(), "mm"), lambda: dy @ w_o[:, i_o], lambda: dy @ w_o))
    records: list[dict[str, Any]] = res.setdefault("ops", [])
    for name, shape, ours, (a, wk, how), gather_cublas, dense_cublas in cases:
        if budget.elapsed() > deadline:
            return f"cut at the phase's time box before {name}"
        rec: dict[str, Any] = {"op": name, "M": m, "out_shape": list(shape), "keep": keep}
        try:
            pre = (lambda: lin(a, wk)) if how == "lin" else (lambda: a @ wk)
            out = ours(poisoned(shape, dtype, dev))  # the first call autotunes
            ref = pre().to(torch.float64) if "scatter" not in name else gather_cublas().to(torch.float64)
            ref64 = (a.double() @ (wk.double().T if how == "lin" else wk.double()))
            if "scatter" in name:
                ref64 = torch.zeros(shape, dtype=torch.float64, device=dev).index_copy_(
                    1, i_q if name.startswith("q") else i_kv, ref64)
            rec["rel_err_vs_fp64"] = rel_err(out, ref64)
            rec["rel_err_cublas_vs_fp64"] = rel_err(ref, ref64)
            rec["passed"] = rec["rel_err_vs_fp64"] <= TOLERANCE["bf16"]
            buf = torch.empty(shape, dtype=dtype, device=dev)
            t = time_gpu_us(lambda: ours(buf), dev)
            rec.update(us=t["us"], method=t["method"], host_us=time_host_us(lambda: ours(buf), dev))
            rec["cublas_pregathered_us"] = time_gpu_us(pre, dev)["us"]
            rec["gather_plus_cublas_us"] = time_gpu_us(gather_cublas, dev)["us"]
            rec["dense_cublas_us"] = time_gpu_us(dense_cublas, dev)["us"]
            rec["vs_dense"] = rec["dense_cublas_us"] / rec["us"]
            rec["vs_pregathered"] = rec["cublas_pregathered_us"] / rec["us"]
            rec["vs_gather_plus_cublas"] = rec["gather_plus_cublas_us"] / rec["us"]
        except Exception as e:  # record and go on
            rec.update(passed=False, error=f"{type(e).__name__}: {e}"[:400])
        records.append(rec)
    del w_up, w_down, w_q, w_k, w_o, w_down_t, x_i, x_qf, x_kvf
    return ""


# --------------------------------------------------------------------------- phase 3: train


def build_model(cfg: dict[str, Any], dtype: torch.dtype, dev: torch.device) -> torch.nn.Module:
    """A seeded random LLaMA of the configured width with PEFT LoRA on every linear."""
    import peft
    import transformers as tf

    config = tf.LlamaConfig(vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"],
                            num_attention_heads=cfg["heads"], num_key_value_heads=cfg["kv_heads"],
                            head_dim=cfg["head_dim"], num_hidden_layers=cfg["layers"],
                            max_position_embeddings=max(2048, cfg["seq"]), tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), torch.device(dev):
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
        model = peft.get_peft_model(model, peft.LoraConfig(r=cfg["lora_rank"], lora_alpha=2 * cfg["lora_rank"],
                                                           lora_dropout=0.0, target_modules="all-linear"))
    model.config.use_cache = False
    return model.to(device=dev, dtype=dtype).train()


def policy_dict(cfg: dict[str, Any]) -> dict[str, Any]:
    """The math10k-like policy on every layer: MLP 0.99, attention 0.75, all tokens sparse, no warm-up."""
    return {"description": "gpu_check: math10k sparsities on every layer, all tokens sparse, no warm-up",
            "defaults": {"mlp": cfg["mlp"], "attn": cfg["attn"], "tokens": "all_sparse", "warmup_steps": 0,
                         "estimator": {"kind": "svd", "rank": cfg["estimator_rank"]}}}


@contextlib.contextmanager
def triton_disabled(flag: bool) -> Iterator[None]:
    """Set SPARSELORA_DISABLE_TRITON for the body only (eager ops read it per call, a compile once)."""
    old = os.environ.get(DISABLE_ENV)
    if flag:
        os.environ[DISABLE_ENV] = "1"
    else:
        os.environ.pop(DISABLE_ENV, None)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(DISABLE_ENV, None)
        else:
            os.environ[DISABLE_ENV] = old


@contextlib.contextmanager
def count_kernel_calls() -> Iterator[dict[str, int]]:
    """Count calls into the four gather-GEMM wrappers (ops.py looks them up on the module per call)."""
    from sparselora_fx.runtime.kernels import gather_gemm as gg

    counts = {name: 0 for name in KERNEL_NAMES}
    originals = {name: getattr(gg, name) for name in KERNEL_NAMES}

    def wrap(name: str) -> Callable[..., Any]:
        def counted(*a: Any, **kw: Any) -> Any:
            counts[name] += 1
            return originals[name](*a, **kw)
        return counted

    for name in KERNEL_NAMES:
        setattr(gg, name, wrap(name))
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(gg, name, fn)


class Side:
    """One compiled model with its optimizer and batch; `step()` times one full train step."""

    def __init__(self, name: str, compiled: Any, model: torch.nn.Module, cfg: dict[str, Any], dev: torch.device,
                 disable_triton: bool = False) -> None:
        self.name, self.compiled, self.model, self.dev, self.disable = name, compiled, model, dev, disable_triton
        self.lowered = 0  # ops swapped for the kernel while this side traced (a cache hit traces nothing)
        self.codes: list[str] = []  # Inductor modules this side compiled or loaded from the cache
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"]), generator=gen).to(dev)
        self.batch = {"input_ids": ids, "labels": ids}
        self.times: list[float] = []
        self.losses: list[float] = []

    def step(self, capture: bool = False) -> float:
        """One timed step; `capture=True` (the compiling step) keeps the code Inductor produces meanwhile."""
        from sparselora_fx import _compat
        from sparselora_fx.counters import lowered

        with triton_disabled(self.disable), (_compat.capture_output_code() if capture
                                             else contextlib.nullcontext([])) as codes:
            _sync(self.dev)
            before = sum(lowered().values())
            t0 = time.perf_counter()
            loss = self.compiled(**self.batch).loss
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            _sync(self.dev)
            dt = time.perf_counter() - t0
            self.lowered += sum(lowered().values()) - before
        self.codes.extend(codes)
        self.losses.append(float(loss.detach()))
        return dt


def own_entry(model: torch.nn.Module, name: str) -> Callable[..., Any]:
    """`model(**batch)` behind a code object of its own.

    Why: Dynamo caches a compiled frame per code object and backend, and two sparse sides with
    equal options are the same backend to it, so the second side would reuse the first side's graph
    (kernel path and all: SPARSELORA_DISABLE_TRITON is read when a graph compiles, and Dynamo
    never sees it). Seen on the H200: the torch side "compiled" in 0.05 s and ran the kernels.
    """
    namespace: dict[str, Any] = {}
    code = compile("def forward(**batch):\n    return model(**batch)\n", f"<gpu_check side {name}>", "exec")
    exec(code, {"model": model}, namespace)  # noqa: S102 - a fixed string, no input
    return namespace["forward"]


def compiled_side_path(codes: list[str], kernel_calls: int, expect_code: bool = True) -> str:
    """triton_op when Inductor's code for the side holds the gather-GEMM kernel; else extern or torch by the calls.

    Why from the code: the swap counters (`lowered_<op>` in sparselora_fx.counters) only count
    traces, and a compile served from torch's caches traces nothing. A side that Inductor made no code for
    (`expect_code`) did not compile a graph of its own: "none", and the check fails.
    """
    if expect_code and not codes:
        return "none (no Inductor code for this side)"
    if any("gather_mm_kernel" in code for code in codes):
        return "triton_op"
    return "extern" if kernel_calls else "torch"


def flops_ideal(cfg: dict[str, Any], model_config: Any) -> dict[str, Any]:
    """Dense-LoRA and SparseLoRA step FLOPs from sparselora_fx.flops (layer 0: no input gradient)."""
    from sparselora_fx.flops import LayerShape, evaluate, flops_dense_lora, flops_sparselora

    shape = LayerShape.from_hf_config(model_config, cfg["lora_rank"])
    kw = dict(n_layers=cfg["layers"], input_grad=False)
    dense = evaluate(flops_dense_lora(shape, cfg["batch"], cfg["seq"], **kw))
    sparse = evaluate(flops_sparselora(shape, cfg["batch"], cfg["seq"], cfg["mlp"], cfg["attn"], cfg["attn"], 0,
                                       cfg["estimator_rank"], "svd", **kw))
    return {"dense_flops": dense["total"], "sparse_flops": sparse["total"], "ideal": dense["total"] / sparse["total"],
            "sparse_estimator_flops": sparse["estimator"],
            "dense_frozen_flops": dense["attn_proj"] + dense["mlp"], "sparse_frozen_flops": sparse["attn_proj"] + sparse["mlp"]}


def phase_train(args: argparse.Namespace, cfg: dict[str, Any], dev: torch.device, res: dict[str, Any],
                budget: Budget, save: Callable[[], None]) -> str:
    """Three sides, interleaved steps, the two ideals; returns a note when cut short."""
    from sparselora_fx.backend import LAST_REPORTS
    from sparselora_fx.policy import Policy

    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    train: dict[str, Any] = res.setdefault("train", {})
    train.update(config=cfg, dtype=str(dtype), policy=policy_dict(cfg), steps=args.steps, warmup=args.warmup)
    if dev.type == "cuda":
        free = torch.cuda.mem_get_info(dev)[0]
        params = cfg["layers"] * (2 * cfg["hidden"] * cfg["heads"] * cfg["head_dim"]
                                  + 2 * cfg["hidden"] * cfg["kv_heads"] * cfg["head_dim"]
                                  + 3 * cfg["hidden"] * cfg["intermediate"]) + 2 * cfg["vocab"] * cfg["hidden"]
        n_models = 5 if args.cudagraphs else 3
        need = n_models * params * 2 * 2 + 24 * 2**30  # bf16 models (fp32 build transient) + activations/workspace
        train["memory_guard"] = {"free_gib": free / 2**30, "need_gib": need / 2**30}
        if free < need:
            return f"skipped: {free / 2**30:.0f} GiB free, the guard wants {need / 2**30:.0f} GiB"
        torch.cuda.set_per_process_memory_fraction(0.9, dev)
    inner = {"inner": "eager"} if args.smoke else {}
    dense_backend = "eager" if args.smoke else "inductor"
    policy = Policy.from_dict(policy_dict(cfg), source="gpu_check")

    t0 = time.monotonic()
    torch._dynamo.reset()
    model_d = build_model(cfg, dtype, dev)
    dense = Side("dense", torch.compile(model_d, backend=dense_backend, dynamic=False), model_d, cfg, dev)
    model_s = build_model(cfg, dtype, dev)
    model_t = build_model(cfg, dtype, dev)  # same seed: the same weights as model_s
    n_reports = n_kern_reports = len(LAST_REPORTS)
    sparse_opts = {"policy": policy, "progress": False, **inner}
    compiled_s = torch.compile(own_entry(model_s, "kernels"), backend="sparselora", dynamic=False, options=sparse_opts)
    compiled_t = torch.compile(own_entry(model_t, "torch"), backend="sparselora", dynamic=False,
                               options=dict(sparse_opts))
    sparse_torch = Side("sparselora_torch", compiled_t, model_t, cfg, dev, disable_triton=True)
    sparse_kern = Side("sparselora_kernels", compiled_s, model_s, cfg, dev, disable_triton=False)
    extra: list[Side] = []  # CUDA graphs: is the sparse step host-bound? (launch gaps vs kernels)
    if args.cudagraphs and dev.type == "cuda":
        model_dc = build_model(cfg, dtype, dev)
        extra.append(Side("dense_cudagraphs", torch.compile(model_dc, mode="reduce-overhead", dynamic=False),
                          model_dc, cfg, dev))
        model_kc = build_model(cfg, dtype, dev)
        cg_opts = {**sparse_opts, "inductor": {"triton.cudagraphs": True}}
        extra.append(Side("sparselora_kernels_cudagraphs", torch.compile(own_entry(model_kc, "kernels_cg"),
                          backend="sparselora", dynamic=False, options=cg_opts), model_kc, cfg, dev))
    train["build_s"] = time.monotonic() - t0
    sides = [dense, sparse_torch, sparse_kern, *extra]
    out_sides: dict[str, Any] = train.setdefault("sides", {})
    # First steps compile. The path is fixed at compile time (the kernel goes into the graph), so
    # each sparse side compiles its own model, the torch side with SPARSELORA_DISABLE_TRITON=1 set.
    for side in (dense, sparse_kern, sparse_torch, *extra):
        if budget.left() < 20:
            return f"cut before compiling {side.name}: {budget.left():.0f} s left"
        try:
            out_sides[side.name] = {"compile_step_s": side.step(capture=True)}
        except Exception as e:
            out_sides[side.name] = {"error": f"{type(e).__name__}: {e}"[:600], "trace": traceback.format_exc()[-2000:]}
        if side is sparse_kern:
            n_kern_reports = len(LAST_REPORTS)
        save()
    reports = LAST_REPORTS[n_reports:n_kern_reports]  # the torch side compiles the same graphs again
    train["report"] = [r.counts() for r in reports]
    train["groups"] = [{"name": gi.name, "kind": gi.kind, "sparsity": gi.sparsity, "keep": gi.keep,
                        "channels": gi.channels} for r in reports for gi in r.groups]
    train["expected_keep"] = exp = keep_counts(cfg)
    got = {gi["kind"]: gi["keep"] for gi in train["groups"]}
    train["keep_matches_plan"] = bool(reports) and got == {"gated_mlp": exp["mlp"], "attn_qk": exp["q"] // cfg["heads"],
                                                           "attn_vo": exp["v"]}
    if not train["keep_matches_plan"]:
        res["notes"].append(f"train: the plan's keep counts {got} differ from the ones the op and time-ideal "
                            f"GEMMs assume {exp}: the time-based ideal is off by that much")
    sparse_ok = all("error" not in out_sides.get(s.name, {"error": "not compiled"}) for s in (sparse_torch, sparse_kern))
    ok = [s for s in sides if "error" not in out_sides.get(s.name, {"error": "not compiled"})]

    def failed(side: Side, when: str, err: Exception) -> None:
        # A side that breaks after compiling (a CUDA-graph capture runs on a later step) is
        # dropped with its error; the other sides' timings stand.
        out_sides[side.name]["error"] = f"{when}: {type(err).__name__}: {err}"[:600]
        res["notes"].append(f"train: {side.name} dropped at {when}: {traceback.format_exc()[-1200:]}")
        if side in ok:
            ok.remove(side)

    # Which path each sparse side runs: the kernel in the code Inductor generated (or loaded from
    # its cache) for it, or calls into the kernel wrappers from the extern ops (counted over one step).
    if sparse_ok:
        check: dict[str, Any] = {}
        for side in (sparse_torch, sparse_kern):
            with count_kernel_calls() as counts:
                try:
                    side.step()
                except Exception as e:
                    failed(side, "path check", e)
            path = compiled_side_path(side.codes, sum(counts.values()), expect_code=not args.smoke)
            check[side.name] = {**counts, "lowered_ops": side.lowered, "inductor_modules": len(side.codes),
                                "path": path}
            out_sides[side.name]["path"] = path
            if path == "triton_op" and not side.lowered:
                res["notes"].append(f"train: {side.name} runs the kernel from a cached compile (no trace swapped an op)")
        expect_kernels = dev.type == "cuda"
        check["kernels_expected"] = expect_kernels
        check["expected_kernel_path"] = _compiled_path(dev)
        kernel_paths = ("triton_op", "extern") if expect_kernels else ("torch",)
        check["passed"] = (check["sparselora_torch"]["path"] == "torch"
                           and check["sparselora_kernels"]["path"] in kernel_paths)
        train["env_switch_check"] = check
    if extra:  # Inductor skips CUDA graphs silently (a CPU op, a mutation): count the skips
        from torch._dynamo.utils import counters

        train["cudagraph_skips"] = int(counters["inductor"].get("cudagraph_skips", 0))

    for _ in range(args.warmup):
        for side in list(ok):
            try:
                side.step()
            except Exception as e:
                failed(side, "warm-up", e)
    done = 0
    for i in range(args.steps):
        if budget.left() < 25 or not ok:
            break
        for side in ok[i % len(ok):] + ok[:i % len(ok)]:  # rotate the order each round
            try:
                side.times.append(side.step())
            except Exception as e:
                failed(side, f"timed round {i}", e)
        done += 1
    for side in ok:
        ts = side.times
        rec = out_sides.setdefault(side.name, {})
        rec.update(step_s=statistics.median(ts) if ts else float("nan"), min_s=min(ts, default=float("nan")),
                   max_s=max(ts, default=float("nan")), n=len(ts), times_s=list(ts), losses=list(side.losses))
    profiles: dict[str, Any] = train.setdefault("profile", {})
    for side in ok:  # one profiled step per side: where the time goes (device busy vs wall)
        try:
            profiles[side.name] = profile_step(side)
        except Exception as e:  # a profiler problem must not cost the ideals below
            res["notes"].append(f"train: profiling {side.name} failed: {type(e).__name__}: {e}"[:400])
    save()
    for side in list(ok):  # peak memory of one step above what is held between steps (a CUDA-graph
        if dev.type == "cuda":  # side's pool is held between steps, so it is not in this number)
            with triton_disabled(side.disable):
                torch.cuda.synchronize(dev)
                base = torch.cuda.memory_allocated(dev)
                torch.cuda.reset_peak_memory_stats(dev)
            try:
                side.step()
            except Exception as e:
                failed(side, "peak-memory step", e)
                continue
            out_sides[side.name]["peak_step_mem_gib"] = (torch.cuda.max_memory_allocated(dev) - base) / 2**30
    # Ideals.
    fl = flops_ideal(cfg, model_d.config)
    train["flops"] = fl
    t_ideal = time_ideal(cfg, dev, res, out_sides.get("dense", {}).get("step_s"))
    train["time_ideal"] = t_ideal
    by_name = {side.name: side for side in sides}
    # Each sparse side against the dense side run the same way (CUDA graphs or not); the
    # time-based ideal comes from the plain dense step.
    for name, base in (("sparselora_torch", "dense"), ("sparselora_kernels", "dense"),
                       ("sparselora_kernels_cudagraphs", "dense_cudagraphs")):
        d = out_sides.get(base, {}).get("step_s")
        s = out_sides.get(name, {}).get("step_s")
        if d and s and s == s and d == d:
            rec = out_sides[name]
            rec["baseline"] = base
            rec["speedup"] = d / s
            rec["efficiency_flops"] = rec["speedup"] / fl["ideal"]
            if t_ideal.get("ideal") and base == "dense":  # the time ideal is the plain dense step's
                rec["efficiency_time"] = rec["speedup"] / t_ideal["ideal"]
            rec["paired_speedups"] = [a / b for a, b in zip(by_name[base].times, by_name[name].times)]
    del model_d, model_s, model_t, dense, sparse_torch, sparse_kern, sides, ok, compiled_s, compiled_t, extra, by_name
    dropped = [name for name, rec in out_sides.items() if "error" in rec]
    if done < args.steps:
        return f"budget: {done} of {args.steps} timed rounds ran" + (f"; dropped: {', '.join(dropped)}" if dropped else "")
    if dropped:
        return f"dropped after errors: {', '.join(dropped)}"
    return ""


def profile_step(side: Side) -> dict[str, Any]:
    """One step under torch.profiler: device-busy time (sum of kernel times) against the step's wall
    time, and the kernels and host ops that take the most time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if side.dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        wall = side.step()
    rows = prof.key_averages()

    def dev_us(e: Any) -> float:
        return float(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0)

    kernels = [e for e in rows if str(getattr(e, "device_type", "")).endswith("CUDA") and dev_us(e) > 0]
    return {"wall_ms": 1e3 * wall, "device_busy_ms": sum(dev_us(e) for e in kernels) / 1e3,
            "kernel_launches": sum(e.count for e in kernels),
            "top_device": [[e.key[:100], e.count, dev_us(e) / 1e3] for e in sorted(kernels, key=dev_us, reverse=True)[:15]],
            "top_host": [[e.key[:100], e.count, e.self_cpu_time_total / 1e3]
                         for e in sorted(rows, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]]}


def time_ideal(cfg: dict[str, Any], dev: torch.device, res: dict[str, Any], dense_step_s: float | None) -> dict[str, Any]:
    """Dense step - time of the GEMMs that go sparse + cuBLAS time of the same GEMMs at kept size."""
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    g = torch.Generator(device=dev).manual_seed(3)
    m = cfg["batch"] * cfg["seq"]
    gemms = sparse_gemms(cfg, keep_counts(cfg))
    cache: dict[tuple, float] = {}
    dense_us = kept_us = 0.0
    for gm in gemms:
        if gm["count"] == 0:
            continue
        for which in ("dense", "kept"):
            key = (gm["kind"], *gm[which])
            if key not in cache:
                cache[key] = time_cublas_gemm(m, gm[which][0], gm[which][1], gm["kind"], dtype, dev, g)
            gm[f"{which}_us"] = cache[key]
        dense_us += gm["count"] * gm["dense_us"]
        kept_us += gm["count"] * gm["kept_us"]
    out: dict[str, Any] = {"gemms": gemms, "dense_gemms_s": dense_us / 1e6, "kept_gemms_s": kept_us / 1e6}
    if dense_step_s:
        ideal_step = dense_step_s - out["dense_gemms_s"] + out["kept_gemms_s"]
        out.update(ideal_step_s=ideal_step, ideal=dense_step_s / ideal_step if ideal_step > 0 else None)
        if ideal_step <= 0:  # the GEMMs alone took longer than the whole step: the machine's load moved
            out["why_no_ideal"] = (f"the GEMMs that go sparse, timed alone, took {1e3 * out['dense_gemms_s']:.1f} ms, "
                                   f"more than the whole dense step ({1e3 * dense_step_s:.1f} ms): timing noise "
                                   "(a loaded machine), so no time-based ideal")
    return out


# --------------------------------------------------------------------------- report


def markdown(res: dict[str, Any]) -> str:
    """The run as markdown: phases, correctness summary, op table, train table with the ideals."""
    from tabulate import tabulate

    env = res.get("env", {})
    lines = [f"# GPU check ({env.get('gpu', env.get('device', '?'))}, torch {env.get('torch')}, "
             f"triton {env.get('triton')}, transformers {env.get('transformers')}, peft {env.get('peft')})", ""]
    if "ceiling_bf16_matmul_tflops" in env:
        lines.append(f"Ceilings on random data: bf16 8192^3 matmul {env['ceiling_bf16_matmul_tflops']:.0f} TFLOP/s, "
                     f"device copy {env['ceiling_copy_tb_s']:.2f} TB/s (read + write).")
        lines.append("")
    lines.append(tabulate([[k, v["status"], f"{v['seconds']:.1f}", v.get("note", "")] for k, v in res["phases"].items()],
                          headers=["phase", "status", "s", "note"], tablefmt="github"))
    ks = res.get("kernels", [])
    if ks:
        lines += ["", f"## Kernel correctness vs float64 ({sum(r['passed'] for r in ks)}/{len(ks)} passed)", ""]
        rows = [[r["case"], r["dtype"], f"{r['M']}x{r['K']}->{r['N']} n={r['n']}", r.get("path", ""),
                 f"{r['rel_err']:.1e}" if "rel_err" in r else r.get("error", "")[:60], f"{r.get('tol', 0):.0e}",
                 "ok" if r["passed"] else "FAIL"] for r in ks]
        lines.append(tabulate(rows, headers=["case", "dtype", "size", "path", "rel err", "tol", ""], tablefmt="github"))
    ops = res.get("ops", [])
    if ops:
        lines += ["", "## Per-op time, bf16, M = %d tokens (GPU time from graph replays, us)" % ops[0]["M"], ""]
        rows = []
        for r in ops:
            if "error" in r:
                rows.append([r["op"], "error: " + r["error"][:80]] + [""] * 8)
                continue
            rows.append([r["op"], "x".join(map(str, r["out_shape"])), f"{r['us']:.1f}", f"{r['host_us']:.1f}",
                         f"{r['cublas_pregathered_us']:.1f}", f"{r['gather_plus_cublas_us']:.1f}",
                         f"{r['dense_cublas_us']:.1f}" if "dense_cublas_us" in r else "",
                         f"{r['vs_pregathered']:.2f}", f"{r['vs_gather_plus_cublas']:.2f}",
                         f"{r['rel_err_vs_fp64']:.1e}"])
        lines.append(tabulate(rows, headers=["op", "out", "ours", "ours+host", "cuBLAS pre-gathered", "gather+cuBLAS",
                                             "dense cuBLAS", "x vs pre-gathered", "x vs gather+cuBLAS", "rel err"],
                              tablefmt="github"))
    tr = res.get("train", {})
    sides = tr.get("sides", {})
    if sides:
        c = tr["config"]
        lines += ["", f"## Train step: hidden {c['hidden']}, intermediate {c['intermediate']}, {c['layers']} layers, "
                      f"{c['heads']}/{c['kv_heads']} heads, LoRA r={c['lora_rank']}, {c['batch']}x{c['seq']} tokens, "
                      f"{tr['dtype']}; MLP {c['mlp']}, attention {c['attn']}, all tokens sparse", ""]
        rows = []
        for name, s in sides.items():
            if "error" in s:
                rows.append([name, "error: " + s["error"][:100]] + [""] * 7)
                continue
            rows.append([name, s.get("path", ""), f"{1e3 * s.get('step_s', float('nan')):.1f}",
                         f"{1e3 * s.get('min_s', float('nan')):.1f}-{1e3 * s.get('max_s', float('nan')):.1f}",
                         s.get("n", 0), f"{s['speedup']:.2f}x vs {s['baseline']}" if "speedup" in s else "",
                         f"{s['efficiency_flops']:.2f}" if "efficiency_flops" in s else "",
                         f"{s['efficiency_time']:.2f}" if "efficiency_time" in s else "",
                         f"{s['peak_step_mem_gib']:.1f}" if "peak_step_mem_gib" in s else ""])
        lines.append(tabulate(rows, headers=["side", "path", "median ms", "min-max ms", "n", "speedup", "eff. (FLOPs)",
                                             "eff. (time)", "peak step GiB"], tablefmt="github"))
        fl, ti = tr.get("flops", {}), tr.get("time_ideal", {})
        if fl:
            lines += ["", f"FLOPs-ideal speedup {fl['ideal']:.2f}x (dense {fl['dense_flops'] / 1e9:.4g} GFLOP, sparse "
                          f"{fl['sparse_flops'] / 1e9:.4g} GFLOP per step). Time-based ideal "
                          + (f"{ti['ideal']:.2f}x (dense GEMMs that go sparse {1e3 * ti['dense_gemms_s']:.1f} ms -> "
                             f"{1e3 * ti['kept_gemms_s']:.1f} ms on pre-gathered weights)" if ti.get("ideal")
                             else f"n/a ({ti.get('why_no_ideal', 'no dense step time')})")
                          + f". Paper's efficiency: {PAPER_EFFICIENCY}."]
        for name, pr in tr.get("profile", {}).items():
            lines += ["", f"Profiled step, {name}: device busy {pr['device_busy_ms']:.1f} ms of {pr['wall_ms']:.1f} ms wall "
                          f"(profiler on), {pr['kernel_launches']} kernel launches. Top kernels (ms): "
                          + "; ".join(f"{k[:60]} x{c} {ms:.2f}" for k, c, ms in pr["top_device"][:8])
                          + ". Top host ops (self ms): " + "; ".join(f"{k[:40]} x{c} {ms:.2f}" for k, c, ms in pr["top_host"][:6])]
        chk = tr.get("env_switch_check")
        if chk:
            lines += ["", f"Paths (fixed at compile time): with {DISABLE_ENV}=1 {chk['sparselora_torch']['path']}, "
                          f"without {chk['sparselora_kernels']['path']} (read from Inductor's code; ops swapped for "
                          f"the kernel while tracing: {chk['sparselora_kernels']['lowered_ops']}) -> "
                          f"{'ok' if chk['passed'] else 'FAIL'}."]
    notes = res.get("notes", [])
    if notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def write(res: dict[str, Any], out_dir: Path) -> None:
    """Rewrite gpu_check.json and .md (after every phase: a killed run keeps what it measured)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_check.json").write_text(json.dumps(res, indent=2, default=str) + "\n", encoding="utf-8")
    (out_dir / "gpu_check.md").write_text(markdown(res), encoding="utf-8")


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    """Run the phases in order within the budget; exit 1 if a correctness check failed."""
    args = parse_args(argv)
    os.environ.setdefault("SPARSELORA_DISK_CACHE", "0")  # SVD factors stay in memory: no disk writes
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before the first kernel call: kernels are decorated lazily
        torch.set_num_threads(min(2, torch.get_num_threads()))
    elif not torch.cuda.is_available():
        print("gpu_check: needs a CUDA GPU (or --smoke for the CPU dry run).", file=sys.stderr)
        return 2
    dev = torch.device("cuda", 0) if not args.smoke else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(args.seed)
    cfg = dict(SMOKE if args.smoke else FULL)
    budget = Budget(args.budget_s)
    out_dir = Path(args.out)
    res: dict[str, Any] = {"config": {**vars(args), "sizes": cfg}, "phases": {}, "notes": []}
    wanted = [p.strip() for p in args.phases.split(",") if p.strip()]
    # Time boxes (fractions of the budget, from the phase's start) for the phases that compile many
    # small kernels; train needs 30% of the budget left to start and takes the rest.
    box = {"kernels": 0.15, "ops": 0.2}
    for phase in ("env", "kernels", "ops", "train"):
        if phase not in wanted:
            continue
        t0 = time.monotonic()
        status, note = "ok", ""
        try:
            if phase in ("kernels", "ops"):
                from sparselora_fx.runtime.kernels import HAS_TRITON

                if not HAS_TRITON:
                    status, note = "skipped", "triton is not importable"
            if status == "ok" and phase == "env":
                phase_env(args, dev, res, budget)
            elif status == "ok" and phase == "kernels":
                note = phase_kernels(args, dev, res, budget, budget.elapsed() + box["kernels"] * args.budget_s)
            elif status == "ok" and phase == "ops":
                note = phase_ops(args, cfg, dev, res, budget, budget.elapsed() + box["ops"] * args.budget_s)
            elif status == "ok" and phase == "train":
                need = 0.3 * args.budget_s
                if budget.left() < need:
                    status, note = "skipped", f"budget: {budget.left():.0f} s left, the train phase wants {need:.0f}"
                else:
                    note = phase_train(args, cfg, dev, res, budget, lambda: write(res, out_dir))
            if note and status == "ok":
                status = "skipped" if note.startswith("skipped") else "partial"
        except Exception as e:  # a phase failing must not lose the others' results
            status, note = "failed", f"{type(e).__name__}: {e}"[:600]
            res["notes"].append(f"{phase}: {traceback.format_exc()[-1500:]}")
        res["phases"][phase] = {"status": status, "seconds": time.monotonic() - t0, "note": note}
        print(f"[gpu_check] {phase}: {status} in {time.monotonic() - t0:.1f} s {note}", flush=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        write(res, out_dir)
    failed = [r for r in res.get("kernels", []) + res.get("ops", []) if not r.get("passed")]
    chk = res.get("train", {}).get("env_switch_check")
    res["summary"] = {
        "correctness_failures": len(failed),
        "env_switch_ok": None if chk is None else chk["passed"],
        "elapsed_s": budget.elapsed(),
        "speedup_kernels": res.get("train", {}).get("sides", {}).get("sparselora_kernels", {}).get("speedup"),
        "speedup_torch": res.get("train", {}).get("sides", {}).get("sparselora_torch", {}).get("speedup"),
        "paper_efficiency": PAPER_EFFICIENCY,
        "keep_matches_plan": res.get("train", {}).get("keep_matches_plan"),
        "losses_finite": all(math.isfinite(x) for side in res.get("train", {}).get("sides", {}).values()
                             for x in side.get("losses", [])),
    }
    write(res, out_dir)
    print(markdown(res), flush=True)
    print(f"wrote {out_dir / 'gpu_check.json'} and gpu_check.md", flush=True)
    return 1 if failed or (chk is not None and not chk["passed"]) else 0


if __name__ == "__main__":
    sys.exit(main())
