"""The one Triton kernel behind all four gather-GEMMs (imports triton unguarded).

Why one kernel: every op is C[M, P] = A[M, R] @ B[R, P] where B is a view of
the frozen weight `w` whose rows or columns are picked through `idx`. The
wrapper expresses each op by choosing which of B's two axes is gathered and
which strides of `w` (or of its transposed copy) walk them:

    B[r, p] = w_base[ rowsel(r) * stride_br + colsel(p) * stride_bp ]
    rowsel(r) = idx[r] if GATHER_R else r
    colsel(p) = idx[p] if GATHER_P else p

The gathered weight is never materialised: indices are loaded per tile and
turned into pointers. Only Triton features present in both triton 3.6 and 3.9
are used (masked tl.load/tl.store, tl.dot, tl.program_id, tl.arange, constexpr
blocks). The interpreter stores bfloat16 as raw uint16 and its `tl.dot`
multiplies the bit patterns (triton issue #11584, "not supported yet"), so
under TRITON_INTERPRET=1 the wrapper sets DOT_IN_FP32 and bf16 tiles are
upcast before the dot (exact: bf16 products fit fp32); compiled GPU runs never
take that branch. This module is imported lazily by `gather_gemm`, only when
triton is importable; no `from __future__ import annotations` here, Triton reads the
`tl.constexpr` annotations as objects.
"""

import triton
import triton.language as tl


def gather_mm_kernel(
    a_ptr,
    b_ptr,
    idx_ptr,
    bias_ptr,
    c_ptr,
    M,
    P,
    R,
    M_BUCKET,  # autotune key only: M rounded up to a power of two, so new token counts reuse a tuning
    stride_am,
    stride_ar,
    stride_br,
    stride_bp,
    stride_cm,
    stride_cp,
    GATHER_R: tl.constexpr,
    GATHER_P: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SCATTER_OUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,  # interpreter only: its bf16 tl.dot multiplies bit patterns (triton#11584)
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """C[m, p] = sum_r A[m, r] * B[r, p] (+ bias[colsel(p)]), fp32 accumulation."""
    # Grouped launch order: GROUP_M row-blocks share each B column-block while it sits in L2.
    pid = tl.program_id(0)
    # Plain arithmetic and builtins only (no tl.cdiv / tl.zeros): those library helpers are @jit
    # functions decorated when triton is imported, so they stay compiled-mode objects if
    # TRITON_INTERPRET is set only afterwards (the tests do that) and the interpreter refuses them.
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    num_pid_p = (P + BLOCK_P - 1) // BLOCK_P
    num_pid_in_group = GROUP_M * num_pid_p
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_p = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_m = offs_m < M
    mask_p = offs_p < P
    if GATHER_P:
        col_p = tl.load(idx_ptr + offs_p, mask=mask_p, other=0).to(tl.int64)
    else:
        col_p = offs_p.to(tl.int64)

    # 64-bit row offsets: tokens x width overflows int32 at long contexts.
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
    b_cols = b_ptr + col_p[None, :] * stride_bp

    acc = tl.full((BLOCK_M, BLOCK_P), 0.0, dtype=tl.float32)  # builtin (tl.zeros is a library @jit)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        if GATHER_R:
            row_r = tl.load(idx_ptr + offs_r, mask=mask_r, other=0).to(tl.int64)
        else:
            row_r = offs_r.to(tl.int64)
        a = tl.load(a_rows + offs_r[None, :] * stride_ar, mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        b = tl.load(b_cols + row_r[:, None] * stride_br, mask=mask_r[:, None] & mask_p[None, :], other=0.0)
        if DOT_IN_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + col_p, mask=mask_p, other=0.0)
        acc += bias.to(tl.float32)[None, :]

    if SCATTER_OUT:
        out_p = col_p
    else:
        out_p = offs_p.to(tl.int64)
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + out_p[None, :] * stride_cp
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_p[None, :])


#: Autotune key: problem sizes, B's strides (row-major weight vs transposed copy) and the op flags.
AUTOTUNE_KEY = ["M_BUCKET", "P", "R", "stride_br", "stride_bp", "GATHER_R", "GATHER_P", "HAS_BIAS", "SCATTER_OUT"]


def _quick_bench(kernel_call, quantiles):
    """Shorter autotune timing than triton's default (25 ms warmup, 100 ms reps): tuning is per shape."""
    import triton.testing

    return triton.testing.do_bench(kernel_call, warmup=10, rep=40, quantiles=quantiles)


def build(tiles, early_prune):
    """Return the autotuned kernel for the current interpreter mode.

    Why lazy (called by `gather_gemm` on first use, once per mode): `triton.jit`
    decides at decoration time whether to build an interpreter function
    (TRITON_INTERPRET=1) or a compiled one, so decorating at import would freeze
    whatever the environment said when some other module first imported us.
    `tiles` are `configs.TileConfig`; `early_prune(configs, named_args, **kw)`
    follows triton's `prune_configs_by["early_config_prune"]` contract. With
    `early_prune=None` the autotuner has configs and key only, the form Inductor
    accepts for a kernel it emits into its own code (no pruning hook, no custom timing).
    """
    configs = [
        triton.Config(
            {"BLOCK_M": t.block_m, "BLOCK_P": t.block_p, "BLOCK_R": t.block_r, "GROUP_M": t.group_m},
            num_warps=t.num_warps,
            num_stages=t.num_stages,
        )
        for t in tiles
    ]
    kwargs = {}
    if len(configs) > 1 and early_prune is not None:
        kwargs = {"prune_configs_by": {"early_config_prune": early_prune}, "do_bench": _quick_bench}
    return triton.autotune(configs=configs, key=AUTOTUNE_KEY, **kwargs)(triton.jit(gather_mm_kernel))
