"""Compiled CUDA path: the gather-GEMM Triton kernels inside Inductor's generated code.

Why: the `sparselora::*` ops are `torch.library.custom_op`s, which Inductor treats as opaque
extern calls; their eager CUDA bodies launch the Triton kernels from Python on every call, out
of Inductor's sight (no fusion of the surrounding gathers and zero-fills, no CUDA-graph-friendly
launch, a Python dispatch per op). Here the same kernels become part of the compiled graph.

How (design choice): the public ops keep their names, schemas, fake kernels, autograd formulas
and CPU path; the graph rewrite stays device-agnostic. Next to each public op this module
registers a CUDA-only `torch.library.triton_op`, `sparselora::<op>_triton`, whose body is plain
torch ops plus `wrap_triton(kernel)[grid](...)` launches (tensors, ints, bools and the precision
string only). A `register_torch_dispatch` rule on each public op for the mode AOTAutograd traces
under (FunctionalTensorMode) swaps the public op for its triton_op when the tensors are CUDA,
the dtype is fp16/bf16/fp32, triton imports and neither SPARSELORA_DISABLE_TRITON=1 nor
SPARSELORA_TRITON_LOWERING=0 is set; the triton_op then decomposes into
`triton_kernel_wrapper_functional` nodes, which Inductor compiles as user-defined Triton kernels.
Anything else (CPU, fp64, tensor subclasses, torch.export) keeps the opaque public op, exactly as
before. Autograd is untouched: it sits above the rule, so the backward calls the public `*_dx`
ops, which are lowered the same way; the backward stays the exact sparse one.

Why not make the public ops triton_ops with a CPU kernel: a triton_op decomposes under
AOTAutograd on every device, so CPU graphs would lose the op (and its FLOP formula and saved-
tensor guarantees) to index_select + mm; and why not a rewrite-time choice: the rewrite runs
before AOTAutograd and would have to know the device and the env switches; the rule sees both.

The decision is made when a graph is traced: flipping SPARSELORA_DISABLE_TRITON afterwards
changes the eager ops, not a compiled graph that already holds the kernel. torch's AOTAutograd
and FX graph caches can serve an earlier compile without tracing, so the backend puts
`cache_salt()` (the switches the decision reads) into their key for every graph holding our
ops: a compile under other switches misses the cache and traces again. The counters
`counters["sparselora"]["lowered_<op>"]` (`sparselora_fx.counters`; `LOWERED` reads them by op
name) count the swaps while tracing; a cache hit counts nothing, so it is no record of which path a graph runs
(benchmarks/gpu_check.py reads that from Inductor's generated code).

Weights are read through their strides: GPT-2 Conv1D passes `W.t()` views and fused
projections pass row slices; neither is copied. The rows side (gate/up/q/k/v forward, their
input gradients) gathers inside the kernel; the columns side (down/o forward, their input
gradients) first copies the kept columns into a compact [n, out] block (`_kept_columns`: reading
columns by index inside the kernel was 2-14x slower than cuBLAS on an H200).

Without triton nothing here is registered and the public ops behave as before.
"""

from collections.abc import Callable, Mapping
from typing import Any, Optional

import torch
from torch import Tensor

from sparselora_fx import _compat
from sparselora_fx.counters import counters, lowered
from sparselora_fx.runtime import checks
from sparselora_fx.runtime import kernels as _kernels
from sparselora_fx.runtime import ops as _runtime_ops

__all__ = ["LOWERED", "TRITON_OPS", "cache_salt", "holds_ops", "is_registered", "lowers", "register"]

NAMESPACE = checks.NAMESPACE

#: Public op -> the CUDA triton_op that replaces it in compiled graphs.
TRITON_OPS: dict[str, str] = {
    "rows_linear": "rows_linear_triton",
    "rows_linear_scatter": "rows_linear_scatter_triton",
    "cols_linear": "cols_linear_triton",
    "cols_linear_gather": "cols_linear_gather_triton",
    "rows_linear_dx": "rows_linear_dx_triton",
    "cols_linear_dx": "cols_linear_dx_triton",
}

#: How many times each public op was swapped for its triton_op while a graph was traced: a
#: read-only view of `counters["sparselora"]["lowered_<op>"]` by op name.
LOWERED: Mapping[str, int] = lowered()

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------- kernel launches
# Traceable bodies: torch ops and wrap_triton launches only, so make_fx (AOTAutograd) records
# them and Inductor emits the kernel; eagerly (or under TRITON_INTERPRET=1) they just run.


def _launch(a: Tensor, b: Tensor, idx: Tensor, bias: Optional[Tensor], c: Tensor, m: Any, p: Any, r: Any,
            stride_br: Any, stride_bp: Any, *, gather_r: bool, gather_p: bool, scatter_out: bool) -> None:
    from sparselora_fx.runtime.kernels import gather_gemm

    kernel = gather_gemm.traceable_kernel(a.dtype)
    grid, args, flags = gather_gemm.kernel_call(
        a, b, idx, bias, c, m, p, r, stride_br, stride_bp, c.stride(1),
        gather_r=gather_r, gather_p=gather_p, scatter_out=scatter_out, allow_tf32=False,
    )  # fmt: skip
    torch.library.wrap_triton(kernel)[grid](*args, **flags)


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1]).contiguous()


def _unflat(y2d: Tensor, like: Tensor) -> Tensor:
    return y2d.view(*like.shape[:-1], y2d.shape[-1])


def _rows(x: Tensor, weight: Tensor, idx: Tensor, bias: Optional[Tensor], scatter: bool) -> Tensor:
    x2d, w, idx = _flat(x), weight, idx.contiguous()  # w: any strides (read through them, never copied)
    m, k = x2d.shape
    n = idx.shape[0]
    out = x2d.new_zeros((m, w.shape[0])) if scatter else x2d.new_empty((m, n))
    _launch(x2d, w, idx, None if bias is None else bias.contiguous(), out, m, n, k, w.stride(1), w.stride(0),
            gather_r=False, gather_p=True, scatter_out=scatter)
    return _unflat(out, x)


def _kept_columns(weight: Tensor, idx: Tensor) -> Tensor:
    """`weight[:, idx].T` as a compact row-major [n, out] block (a copy of the kept columns only).

    Why a copy on the columns side: the kernel reading `weight[:, idx]` in place loads single
    elements scattered along K (no vectorised or asynchronous loads); on an H200 at LLaMA-3-8B
    width that ran 0.07-0.5x of cuBLAS (o-proj dX 665 us against 46 us on a pre-gathered
    weight). The block is n x out elements (143 x 4096 for a down-proj at sparsity 0.99), small
    next to the GEMM's [M, out] output, and in this layout the kernel reads it contiguously both
    for the forward (rows of the block) and the input gradient (along each row).
    """
    return weight.t().index_select(0, idx.contiguous()).contiguous()


def _cols(x2d: Tensor, weight: Tensor, idx: Tensor) -> Tensor:
    """[M, n] kept inputs @ weight[:, idx].T -> [M, out]."""
    kept = _kept_columns(weight, idx)  # [n, out]: B[r, p] = kept[r, p]
    out = x2d.new_empty((x2d.shape[0], weight.shape[0]))
    _launch(x2d, kept, idx, None, out, x2d.shape[0], weight.shape[0], idx.shape[0], kept.stride(0), kept.stride(1),
            gather_r=False, gather_p=False, scatter_out=False)
    return out


def rows_linear_triton(x: Tensor, weight: Tensor, idx: Tensor, bias: Optional[Tensor]) -> Tensor:
    """CUDA body of `rows_linear` (kept output channels, [..., k])."""
    checks.check_rows("rows_linear", x, weight, idx, bias)
    return _rows(x, weight, idx, bias, scatter=False)


def rows_linear_scatter_triton(x: Tensor, weight: Tensor, idx: Tensor, bias: Optional[Tensor]) -> Tensor:
    """CUDA body of `rows_linear_scatter` (kept channels written into a zero [..., out])."""
    checks.check_rows("rows_linear_scatter", x, weight, idx, bias)
    return _rows(x, weight, idx, bias, scatter=True)


def cols_linear_triton(x: Tensor, weight: Tensor, idx: Tensor) -> Tensor:
    """CUDA body of `cols_linear` (x holds only the kept input channels)."""
    checks.check_cols_kept("cols_linear", x, weight, idx)
    return _unflat(_cols(_flat(x), weight, idx), x)


def cols_linear_gather_triton(x: Tensor, weight: Tensor, idx: Tensor) -> Tensor:
    """CUDA body of `cols_linear_gather` (reads columns idx of a full-width x)."""
    checks.check_cols_full("cols_linear_gather", x, weight, idx)
    x_kept = x.reshape(-1, x.shape[-1]).index_select(1, idx)
    return _unflat(_cols(x_kept, weight, idx), x)


def rows_linear_dx_triton(grad: Tensor, weight: Tensor, idx: Tensor, in_features: int) -> Tensor:
    """CUDA body of `rows_linear_dx` (grad @ weight[idx] -> [..., in])."""
    checks.check_rows_dx(grad, weight, idx, in_features)
    dy, w, idx = _flat(grad), weight, idx.contiguous()
    out = dy.new_empty((dy.shape[0], w.shape[1]))
    _launch(dy, w, idx, None, out, dy.shape[0], w.shape[1], idx.shape[0], w.stride(0), w.stride(1),
            gather_r=True, gather_p=False, scatter_out=False)
    return _unflat(out, grad)


def cols_linear_dx_triton(grad: Tensor, weight: Tensor, idx: Tensor) -> Tensor:
    """CUDA body of `cols_linear_dx` (grad @ weight[:, idx] -> [..., k])."""
    checks.check_cols_dx(grad, weight, idx)
    dy, kept = _flat(grad), _kept_columns(weight, idx)  # B[r, p] = weight[r, idx[p]] = kept[p, r]
    out = dy.new_empty((dy.shape[0], idx.shape[0]))
    _launch(dy, kept, idx, None, out, dy.shape[0], idx.shape[0], weight.shape[0], kept.stride(1), kept.stride(0),
            gather_r=False, gather_p=False, scatter_out=False)
    return _unflat(out, grad)


_BODIES: dict[str, Callable[..., Tensor]] = {
    "rows_linear": rows_linear_triton,
    "rows_linear_scatter": rows_linear_scatter_triton,
    "cols_linear": cols_linear_triton,
    "cols_linear_gather": cols_linear_gather_triton,
    "rows_linear_dx": rows_linear_dx_triton,
    "cols_linear_dx": cols_linear_dx_triton,
}


# --------------------------------------------------------------------------- selection


def lowers(x: Tensor) -> bool:
    """Whether a compiled graph gets the Triton kernel for an op whose first tensor is `x`.

    Why public: tests and benchmarks/gpu_check.py ask which path a device/dtype takes.
    """
    return (is_registered() and x.device.type == "cuda" and x.dtype in _TRITON_DTYPES
            and _kernels.lowering_enabled(x.device))


def cache_salt() -> str:
    """The switches the swap reads, as a string; the backend makes it part of the compiled-graph cache keys.

    Why: the swap happens while AOTAutograd traces, and a cache hit skips the trace; without
    these in the key, flipping a switch after a cached compile (even in a new process) would
    have no effect. Device and dtype are in the key already (the example inputs).
    """
    from sparselora_fx.runtime.kernels import gather_gemm

    cuda = torch.device("cuda")
    return (f"lowering={int(is_registered() and _kernels.lowering_enabled(cuda))};"
            f"kernels={int(_kernels.kernels_enabled(cuda))};"
            f"autotune={int(gather_gemm._autotune_enabled())};interpret={int(gather_gemm._interpreting())}")


def holds_ops(gm: torch.fx.GraphModule) -> bool:
    """Whether `gm` (or a subgraph of it, e.g. a checkpoint body) calls a `sparselora::` op."""
    for module in gm.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        for node in module.graph.nodes:
            if node.op == "call_function" and _namespace(node.target) == NAMESPACE:
                return True
    return False


def _namespace(target: Any) -> Optional[str]:
    """An op's namespace: `namespace` on an OpOverload, `_qualified_op_name` ("ns::op") on a packet."""
    namespace = getattr(target, "namespace", None)
    if isinstance(namespace, str):
        return namespace
    qualified = getattr(target, "_qualified_op_name", None)
    return qualified.split("::", 1)[0] if isinstance(qualified, str) and "::" in qualified else None


def _swap_rule(public: str) -> Callable[..., Any]:
    """FunctionalTensorMode rule: on the CUDA path, run the triton_op instead of the public op."""
    triton_name = TRITON_OPS[public]

    def rule(mode: Any, op: Any, types: Any, args: Any, kwargs: Any) -> Any:
        if (not args or not isinstance(args[0], Tensor) or not lowers(args[0])
                or not _compat.plain_tensor_types(types) or _compat.triton_decomposition_disabled()):
            return mode.__torch_dispatch__(op, types, args, kwargs)
        counters["sparselora"][f"lowered_{public}"] += 1
        with mode:
            return getattr(getattr(torch.ops, NAMESPACE), triton_name)(*args, **(kwargs or {}))

    return rule


# --------------------------------------------------------------------------- registration

_REGISTERED = False


def is_registered() -> bool:
    """Whether the triton_ops and the swap rules are in place (triton importable, torch fit)."""
    return _REGISTERED


def register(opdefs: dict[str, Any]) -> bool:
    """Register the triton_ops and attach a swap rule to each public op in `opdefs` (name -> CustomOpDef).

    Called once, when this module is imported (the backend imports it), with the ops that
    ``runtime/ops.py`` defined; returns whether the lowering is active.
    """
    global _REGISTERED
    mode_cls = _compat.functional_tensor_mode()
    if not _kernels.HAS_TRITON or mode_cls is None or not hasattr(torch.library, "triton_op"):
        return False
    kernel_src = _kernel_source()
    namespace = getattr(torch.ops, NAMESPACE)
    for public, triton_name in TRITON_OPS.items():
        qualified = f"{NAMESPACE}::{triton_name}"
        if not hasattr(namespace, triton_name):
            torch.library.triton_op(qualified, _BODIES[public], mutates_args=())
        if public in opdefs:
            opdefs[public].register_torch_dispatch(mode_cls, _swap_rule(public))
        for name in (qualified, f"{NAMESPACE}::{public}"):
            _compat.note_triton_kernels(name, kernel_src)
    _REGISTERED = True
    return True


def _kernel_source() -> list[Any]:
    """A compiled-mode JITFunction of the shared kernel, only for its source (cache keys)."""
    try:
        from triton.runtime.jit import JITFunction

        from sparselora_fx.runtime.kernels import _triton_gather_mm

        return [JITFunction(_triton_gather_mm.gather_mm_kernel)]
    except Exception:  # pragma: no cover - a triton without the class: the cache key misses the source
        return []


# On CUDA, compiled graphs get the Triton kernels themselves in place of the public ops.
register(_runtime_ops.OPDEFS)
