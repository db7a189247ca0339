"""Gather-GEMM wrappers: sparse linears on a frozen weight without copying its kept slice.

Why: SparseLoRA keeps, per batch, a subset `idx` of a frozen weight's output
rows (q/k/v/gate/up) or input columns (o/down). Slicing `w[idx]` first costs a
full copy of the kept weight on every step (the reference release's main gap
between FLOPs and wall-clock speedup). These kernels read the kept rows or
columns by index inside the GEMM instead, forward and backward:

    rows_gemm     out[m, j] = sum_k x[m, k] * w[idx[j], k] (+ bias[idx[j]])     [M, n] or scattered [M, N]
    cols_gemm     out       = x @ w[:, idx].T                                   [M, N]
    rows_gemm_dx  dx        = dy @ w[idx, :]                                    [M, K]
    cols_gemm_dx  dx        = dy @ w[:, idx]                                    [M, n]

`w` may have any strides (a `W.t()` view of a GPT-2 Conv1D weight, a row slice
of a fused projection): the kernel reads it through them, never copying it.
Memory access: `rows_gemm` and `rows_gemm_dx` read whole rows of a row-major
`w`, coalesced along K (strided for a transposed view). `cols_gemm` and
`cols_gemm_dx` read `w[:, idx]`, i.e. scattered elements of every row
(uncoalesced along K). Where that hurts, the
caller may build once, per frozen weight, a transposed copy with
`transpose_weight(w)` (memory: `transposed_weight_bytes(w)`) and pass it as
`w_t=`; the kernels then read contiguous rows of `w.T`.

Everything here imports without triton; calling a wrapper without triton, or
with CPU tensors outside the Triton interpreter (TRITON_INTERPRET=1), raises
`KernelUnavailableError`. The caller (the custom ops) decides with
`kernels_enabled(device)` whether to come here at all.

Under torch.compile on CUDA the wrappers are not called: `passes.lower` launches the
same kernel through `torch.library.wrap_triton` with the arguments `kernel_call` builds and
the autotuner `traceable_kernel` returns, so Inductor emits it into its generated code.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import torch

from . import _validate as check
from .configs import DEFAULT_CONFIGS, HOPPER_CONFIGS, INTERPRETER_CONFIGS, TileConfig, fitting, prune
from .errors import KernelUnavailableError

try:
    import triton  # noqa: F401

    _HAS_TRITON = True
except Exception:
    _HAS_TRITON = False

__all__ = [
    "cols_gemm",
    "cols_gemm_dx",
    "rows_gemm",
    "rows_gemm_dx",
    "transpose_weight",
    "transposed_weight_bytes",
]

#: Environment switch: SPARSELORA_TRITON_AUTOTUNE=0 runs the single `DEFAULT_CONFIGS` tile
#: instead of autotuning (no per-shape compile + benchmark; for CI and quick checks).
AUTOTUNE_ENV = "SPARSELORA_TRITON_AUTOTUNE"

# Built lazily, one kernel per (interpreter mode, autotune on) (see `_triton_gather_mm.build`).
_KERNELS: dict[tuple[bool, bool], Any] = {}
# The compiled path's kernels, one per (interpreter mode, autotune on, element size).
_TRACEABLE_KERNELS: dict[tuple[bool, bool, int], Any] = {}


def _interpreting() -> bool:
    """Whether triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except Exception:  # pragma: no cover - triton without knobs
        return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _early_prune(configs: list, named_args: dict, **kwargs: Any) -> list:
    """Adapter from triton's early-prune contract to `configs.prune`."""
    tiles = [
        TileConfig(
            c.kwargs["BLOCK_M"], c.kwargs["BLOCK_P"], c.kwargs["BLOCK_R"], c.num_warps, c.num_stages, c.kwargs["GROUP_M"]
        )
        for c in configs
    ]
    kept = set(prune(tiles, int(named_args["M"]), named_args["a_ptr"].element_size()))
    return [c for c, t in zip(configs, tiles) if t in kept]


def _autotune_enabled() -> bool:
    return os.environ.get(AUTOTUNE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def _kernel() -> Any:
    mode = (_interpreting(), _autotune_enabled())
    kernel = _KERNELS.get(mode)
    if kernel is None:
        from . import _triton_gather_mm

        if mode[0]:
            tiles = INTERPRETER_CONFIGS
        else:
            tiles = HOPPER_CONFIGS if mode[1] else DEFAULT_CONFIGS
        kernel = _KERNELS[mode] = _triton_gather_mm.build(list(tiles), _early_prune)
    return kernel


def traceable_kernel(dtype: torch.dtype) -> Any:
    """The kernel for the compiled path: an autotuner with configs and key only.

    Why not `_kernel()`: Inductor, which emits this kernel into its generated code and
    autotunes it itself, refuses custom timing and needs no pruning hook (that hook reads
    the token count, which may be symbolic while tracing); the tiles that cannot fit shared
    memory for `dtype` are dropped here instead. Under the interpreter it is the same
    single tiny tile as `_kernel()`.
    """
    interp, autotune = _interpreting(), _autotune_enabled()
    elem = torch.empty((), dtype=dtype).element_size()
    mode = (interp, autotune, elem)
    kernel = _TRACEABLE_KERNELS.get(mode)
    if kernel is None:
        from . import _triton_gather_mm

        if interp:
            tiles = list(INTERPRETER_CONFIGS)
        else:
            tiles = fitting(list(HOPPER_CONFIGS if autotune else DEFAULT_CONFIGS), elem) or list(DEFAULT_CONFIGS)
        kernel = _TRACEABLE_KERNELS[mode] = _triton_gather_mm.build(tiles, None)
    return kernel


def _require_runnable(op: str, device: torch.device) -> None:
    if not _HAS_TRITON:
        raise KernelUnavailableError(
            f"{op}: triton is not installed; install the extra (`pip install sparselora-fx[triton]`) "
            f"or use the torch fallback (kernels_enabled() is False without triton)."
        )
    if device.type == "cuda":
        return
    if device.type == "cpu" and _interpreting():
        return
    raise KernelUnavailableError(
        f"{op}: the Triton kernels run on CUDA tensors, got {device}; use the torch fallback there "
        f"(kernels_enabled({str(device)!r}) is False), or for tests on CPU set TRITON_INTERPRET=1 "
        f"before the first kernel call."
    )


def _next_pow2(v: int) -> int:
    return 1 << max(v - 1, 0).bit_length()


def kernel_call(
    a: torch.Tensor,
    b: torch.Tensor,
    idx: torch.Tensor,
    bias: Optional[torch.Tensor],
    c: torch.Tensor,
    m: Any,
    p: Any,
    r: Any,
    stride_br: Any,
    stride_bp: Any,
    stride_cp: Any,
    *,
    gather_r: bool,
    gather_p: bool,
    scatter_out: bool,
    allow_tf32: bool,
) -> tuple[Callable[[dict], tuple[Any]], tuple[Any, ...], dict[str, Any]]:
    """(grid, positional args, constexpr flags) of one launch of the shared kernel.

    Why shared: the eager wrappers below and the compiled path (`passes.lower`, which
    launches through `torch.library.wrap_triton`) must pass the kernel the same arguments.
    Only tensors, ints (possibly symbolic), bools and the precision string go in.
    """
    # bf16 under the interpreter: upcast tiles before tl.dot (its bf16 dot is broken, triton#11584).
    dot_in_fp32 = a.dtype == torch.bfloat16 and a.device.type != "cuda" and _interpreting()
    if a.dtype == torch.float32 or dot_in_fp32:
        precision = "tf32" if (allow_tf32 and not dot_in_fp32) else "ieee"
    else:
        precision = None  # ignored for fp16/bf16 operands; leave triton's default

    def grid(meta: dict) -> tuple[Any]:
        return (((m + meta["BLOCK_M"] - 1) // meta["BLOCK_M"]) * ((p + meta["BLOCK_P"] - 1) // meta["BLOCK_P"]),)

    # M_BUCKET is an autotune key only; a symbolic M (compiled path) is passed as is.
    bucket = _next_pow2(m) if isinstance(m, int) else m
    # Without a bias the kernel never reads bias_ptr (HAS_BIAS=False); `a` stands in, read-only,
    # so that no argument aliases the output the kernel writes.
    args = (
        a, b, idx, bias if bias is not None else a, c,
        m, p, r, bucket,
        a.stride(0), a.stride(1), stride_br, stride_bp, c.stride(0), stride_cp,
    )  # fmt: skip
    flags = dict(
        GATHER_R=gather_r,
        GATHER_P=gather_p,
        HAS_BIAS=bias is not None,
        SCATTER_OUT=scatter_out,
        INPUT_PRECISION=precision,
        DOT_IN_FP32=dot_in_fp32,
    )
    return grid, args, flags


def _launch(a: torch.Tensor, *rest: Any, **kw: Any) -> None:
    """Run the shared kernel for C[M, P] = A[M, R] @ B[R, P] (see `_triton_gather_mm`)."""
    kernel = _kernel()
    grid, args, flags = kernel_call(a, *rest, **kw)
    if a.device.type == "cuda":
        with torch.cuda.device(a.device):
            kernel[grid](*args, **flags)
    else:
        kernel[grid](*args, **flags)


def _transposed(op: str, w_t: object, w: torch.Tensor) -> torch.Tensor:
    wt = check.matrix(op, "w_t", w_t, w.dtype)
    check.same_device(op, "w_t", wt, w.device)
    if tuple(wt.shape) != (w.shape[1], w.shape[0]):
        raise check.KernelInputError(
            f"{op}: `w_t` must be the transposed weight of shape {(w.shape[1], w.shape[0])}, got "
            f"{tuple(wt.shape)}; build it with `transpose_weight(w)`."
        )
    if not wt.is_contiguous():
        raise check.KernelInputError(f"{op}: `w_t` must be contiguous; build it with `transpose_weight(w)`.")
    return wt


def rows_gemm(
    x2d: torch.Tensor,
    w: torch.Tensor,
    idx: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    scatter: bool = False,
    *,
    out: Optional[torch.Tensor] = None,
    allow_tf32: bool = False,
    check_index: bool = False,
) -> torch.Tensor:
    """Output-channel sparse linear: `x2d @ w[idx].T (+ bias[idx])`, rows of `w` read by index.

    Why: the forward of an output-sparse frozen linear (q/k/v/gate/up) without
    materialising `w[idx]`. x2d [M, K], w [N, K], idx [n] -> [M, n]; with
    `scatter=True` -> [M, N] holding the result at columns `idx` and zeros
    elsewhere (the output is zeroed first, then the kept columns written).
    `out` is an optional preallocated result buffer; `check_index=True`
    bounds-checks `idx` (a device sync; for debugging). fp32 inputs use IEEE
    fp32 products unless `allow_tf32=True`.
    """
    op = "rows_gemm"
    x2d = check.matrix(op, "x2d", x2d)
    w = check.matrix(op, "w", w, x2d.dtype)
    dev = x2d.device
    check.same_device(op, "w", w, dev)
    idx = check.index(op, idx, dev)
    m, k = x2d.shape
    n_full = w.shape[0]
    check.dim_match(op, "x2d.shape[1] (input channels)", k, "w.shape[1]", w.shape[1])
    if bias is not None:
        bias = check.vector(op, "bias", bias, n_full, x2d.dtype, dev)
    n = idx.numel()
    res = check.output(op, out, (m, n_full) if scatter else (m, n), x2d.dtype, dev)
    _require_runnable(op, dev)
    if check_index:
        check.index_range(op, idx, n_full, "rows of w, i.e. output channels")
    if scatter:
        res.zero_()
    if m == 0 or n == 0:
        return res
    x2d = x2d.contiguous()
    if k == 0:  # empty reduction: only the bias remains
        vals = bias[idx].expand(m, n) if bias is not None else torch.zeros((m, n), dtype=x2d.dtype, device=dev)
        if scatter:
            res[:, idx] = vals
        else:
            res.copy_(vals)
        return res
    _launch(
        x2d, w, idx, bias, res, m, n, k,
        stride_br=w.stride(1), stride_bp=w.stride(0), stride_cp=res.stride(1),
        gather_r=False, gather_p=True, scatter_out=scatter, allow_tf32=allow_tf32,
    )  # fmt: skip
    return res


def cols_gemm(
    x2d: torch.Tensor,
    w: torch.Tensor,
    idx: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    w_t: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    allow_tf32: bool = False,
    check_index: bool = False,
) -> torch.Tensor:
    """Input-channel sparse linear: `x2d @ w[:, idx].T (+ bias)`, columns of `w` read by index.

    Why: the forward of an input-sparse frozen linear (o/down) where `x2d`
    already holds only the kept input channels. x2d [M, n], w [N, K], idx [n]
    -> [M, N]; the reduction runs over the n kept channels. Reading `w[:, idx]`
    is uncoalesced along K; pass `w_t=transpose_weight(w)` (a one-time [K, N]
    copy) to read contiguous rows of `w.T` instead. `bias` [N] (dense) is
    fused into the epilogue. See `rows_gemm` for `out`, `allow_tf32`,
    `check_index`.
    """
    op = "cols_gemm"
    x2d = check.matrix(op, "x2d", x2d)
    w = check.matrix(op, "w", w, x2d.dtype)
    dev = x2d.device
    check.same_device(op, "w", w, dev)
    idx = check.index(op, idx, dev)
    m, n = x2d.shape
    n_full, k = w.shape
    check.dim_match(op, "x2d.shape[1] (kept input channels)", n, "idx.numel()", idx.numel())
    if bias is not None:
        bias = check.vector(op, "bias", bias, n_full, x2d.dtype, dev)
    wt = _transposed(op, w_t, w) if w_t is not None else None
    res = check.output(op, out, (m, n_full), x2d.dtype, dev)
    _require_runnable(op, dev)
    if check_index:
        check.index_range(op, idx, k, "columns of w, i.e. input channels")
    if m == 0 or n_full == 0:
        return res
    if n == 0:  # empty reduction: only the bias remains
        res.copy_(bias.expand(m, n_full) if bias is not None else torch.zeros_like(res))
        return res
    x2d = x2d.contiguous()
    if wt is not None:  # B[r, p] = w[p, idx[r]] = w_t[idx[r], p]: contiguous along p
        b, s_br, s_bp = wt, wt.stride(0), wt.stride(1)
    else:
        b, s_br, s_bp = w, w.stride(1), w.stride(0)
    _launch(
        x2d, b, idx, bias, res, m, n_full, n,
        stride_br=s_br, stride_bp=s_bp, stride_cp=res.stride(1),
        gather_r=True, gather_p=False, scatter_out=False, allow_tf32=allow_tf32,
    )  # fmt: skip
    return res


def rows_gemm_dx(
    dy2d: torch.Tensor,
    w: torch.Tensor,
    idx: torch.Tensor,
    *,
    out: Optional[torch.Tensor] = None,
    allow_tf32: bool = False,
    check_index: bool = False,
) -> torch.Tensor:
    """Input gradient of `rows_gemm`: `dy2d @ w[idx, :]`, reduction over the kept rows.

    Why: the exact dX of the output-sparse forward, without copying `w[idx]`.
    dy2d [M, n], w [N, K], idx [n] -> [M, K]. Rows of `w` are read whole
    (coalesced). See `rows_gemm` for `out`, `allow_tf32`, `check_index`.
    """
    op = "rows_gemm_dx"
    dy2d = check.matrix(op, "dy2d", dy2d)
    w = check.matrix(op, "w", w, dy2d.dtype)
    dev = dy2d.device
    check.same_device(op, "w", w, dev)
    idx = check.index(op, idx, dev)
    m, n = dy2d.shape
    n_full, k = w.shape
    check.dim_match(op, "dy2d.shape[1] (kept output channels)", n, "idx.numel()", idx.numel())
    res = check.output(op, out, (m, k), dy2d.dtype, dev)
    _require_runnable(op, dev)
    if check_index:
        check.index_range(op, idx, n_full, "rows of w, i.e. output channels")
    if m == 0 or k == 0:
        return res
    if n == 0:
        return res.zero_()
    dy2d = dy2d.contiguous()
    _launch(
        dy2d, w, idx, None, res, m, k, n,
        stride_br=w.stride(0), stride_bp=w.stride(1), stride_cp=res.stride(1),
        gather_r=True, gather_p=False, scatter_out=False, allow_tf32=allow_tf32,
    )  # fmt: skip
    return res


def cols_gemm_dx(
    dy2d: torch.Tensor,
    w: torch.Tensor,
    idx: torch.Tensor,
    *,
    w_t: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    allow_tf32: bool = False,
    check_index: bool = False,
) -> torch.Tensor:
    """Input gradient of `cols_gemm`: `dy2d @ w[:, idx]`, only the kept input channels.

    Why: the exact dX of the input-sparse forward (the dropped channels get no
    gradient through the frozen path). dy2d [M, N], w [N, K], idx [n] ->
    [M, n]. Reading `w[:, idx]` is uncoalesced; `w_t=transpose_weight(w)`
    reads contiguous rows of `w.T` instead. See `rows_gemm` for `out`,
    `allow_tf32`, `check_index`.
    """
    op = "cols_gemm_dx"
    dy2d = check.matrix(op, "dy2d", dy2d)
    w = check.matrix(op, "w", w, dy2d.dtype)
    dev = dy2d.device
    check.same_device(op, "w", w, dev)
    idx = check.index(op, idx, dev)
    m, n_full = dy2d.shape
    k = w.shape[1]
    check.dim_match(op, "dy2d.shape[1] (output channels)", n_full, "w.shape[0]", w.shape[0])
    wt = _transposed(op, w_t, w) if w_t is not None else None
    n = idx.numel()
    res = check.output(op, out, (m, n), dy2d.dtype, dev)
    _require_runnable(op, dev)
    if check_index:
        check.index_range(op, idx, k, "columns of w, i.e. input channels")
    if m == 0 or n == 0:
        return res
    if n_full == 0:
        return res.zero_()
    dy2d = dy2d.contiguous()
    if wt is not None:  # B[r, p] = w[r, idx[p]] = w_t[idx[p], r]
        b, s_br, s_bp = wt, wt.stride(1), wt.stride(0)
    else:
        b, s_br, s_bp = w, w.stride(0), w.stride(1)
    _launch(
        dy2d, b, idx, None, res, m, n, n_full,
        stride_br=s_br, stride_bp=s_bp, stride_cp=res.stride(1),
        gather_r=False, gather_p=True, scatter_out=False, allow_tf32=allow_tf32,
    )  # fmt: skip
    return res


def transpose_weight(w: torch.Tensor) -> torch.Tensor:
    """One-time contiguous copy of `w.T` ([K, N]) for the `w_t=` path of the cols kernels.

    Why: `w[:, idx]` reads are scattered within every row of a row-major
    weight; rows of `w.T` are contiguous. Costs `transposed_weight_bytes(w)`
    extra memory per frozen weight, so callers build it once and cache it,
    and only where the benchmark shows it wins.
    """
    return w.detach().t().contiguous()


def transposed_weight_bytes(w: torch.Tensor) -> int:
    """Bytes `transpose_weight(w)` would allocate, for memory reports and opt-in decisions."""
    return w.numel() * w.element_size()
