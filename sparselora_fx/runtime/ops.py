"""Gather-linear custom ops: a linear layer that computes only the kept channels of a frozen weight.

Why custom ops and not `index_select` + `linear` written into the graph: the AOT partitioner
would save the gathered weight `W[idx]` for backward (gigabytes at 8B scale). These ops save
only `(weight, idx)` and gather again inside the backward op (the Triton kernels read by index
and copy nothing), so FLOPs, saved memory and fake-tensor shapes stay exactly what is executed.
On CPU (and wherever the Triton path is off) Inductor calls each as one extern op; on CUDA a
compiled graph gets the Triton kernel itself in place of the op (passes/lower.py).

Ops (namespace `sparselora`; `OPS` lists them):

- `rows_linear(x[..., in], W[out, in], idx[k], bias?) -> [..., k]`: kept output channels
  (gate/up/fc1 side of an MLP).
- `rows_linear_scatter(...) -> [..., out]`: the same values written at columns `idx` of a
  zero full-width output (q/k/v side, where the dense LoRA output is added to it).
- `cols_linear(x[..., k], W[out, in], idx[k]) -> [..., out]`: kept input channels only
  (down/fc2 side); a bias is added by the caller.
- `cols_linear_gather(x[..., in], W, idx) -> [..., out]`: reads only columns `idx` of a
  full-width input (o_proj side).
- `rows_linear_dx`, `cols_linear_dx`: the input gradients, ops of their own so that backward
  is counted, traced and (on CUDA) run by the same gather-GEMM kernels.

The base weight and bias are frozen: only `x` is differentiable. `idx` must hold distinct
in-range channel indices (what top-k yields); that is not checked at run time because the
check would synchronise the device on every call.
"""

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from sparselora_fx.runtime import checks

__all__ = [
    "OPS",
    "cols_linear",
    "cols_linear_dx",
    "cols_linear_gather",
    "rows_linear",
    "rows_linear_dx",
    "rows_linear_scatter",
]

NAMESPACE = checks.NAMESPACE

#: Names of the ops this module registers under `torch.ops.sparselora` (for docs and checks).
OPS: tuple[str, ...] = (
    "rows_linear",
    "rows_linear_scatter",
    "cols_linear",
    "cols_linear_gather",
    "rows_linear_dx",
    "cols_linear_dx",
)

# fp64 always takes the torch path: the Triton kernels target training dtypes.
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------- dispatch


@functools.cache
def _kernel_modules() -> Optional[tuple[ModuleType, ModuleType]]:
    """Import (kernels, kernels.gather_gemm) once; None when Triton or the modules are absent."""
    try:
        from sparselora_fx.runtime import kernels
        from sparselora_fx.runtime.kernels import gather_gemm
    except ImportError:
        return None
    if not getattr(kernels, "HAS_TRITON", False):
        return None
    return kernels, gather_gemm


def _kernels_for(device: torch.device, dtype: torch.dtype) -> Optional[ModuleType]:
    """The one dispatch point: Triton kernels on CUDA when available and enabled, else None.

    None means the device-generic torch path (index_select + mm), which runs anywhere.
    """
    if device.type != "cuda" or dtype not in _TRITON_DTYPES:
        return None
    modules = _kernel_modules()
    if modules is None:
        return None
    kernels, gather_gemm = modules
    return gather_gemm if kernels.kernels_enabled(device) else None


# --------------------------------------------------------------------------- real kernels
# Each works on a 2-D view [M, features] and restores the leading dimensions at the end; the
# gathered weight inside the torch path is a temporary of the forward, never saved.


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


def _unflat(y2d: Tensor, like: Tensor) -> Tensor:
    return y2d.view(*like.shape[:-1], y2d.shape[-1])


def _rows_values(x2d: Tensor, weight: Tensor, idx: Tensor, bias: Optional[Tensor]) -> Tensor:
    w_kept = weight.index_select(0, idx)
    if bias is None:
        return torch.mm(x2d, w_kept.t())
    return torch.addmm(bias.index_select(0, idx), x2d, w_kept.t())


def _rows_linear_impl(x: Tensor, weight: Tensor, idx: Tensor, bias: Optional[Tensor]) -> Tensor:
    checks.check_rows("rows_linear", x, weight, idx, bias)
    kernels = _kernels_for(x.device, x.dtype)
    if kernels is not None:
        return _unflat(kernels.rows_gemm(_flat(x).contiguous(), weight, idx, bias), x)
    return _unflat(_rows_values(_flat(x), weight, idx, bias), x)


def _rows_linear_scatter_impl(
    x: Tensor, weight: Tensor, idx: Tensor, bias: Optional[Tensor]
) -> Tensor:
    checks.check_rows("rows_linear_scatter", x, weight, idx, bias)
    kernels = _kernels_for(x.device, x.dtype)
    x2d = _flat(x)
    if kernels is not None:
        return _unflat(kernels.rows_gemm(x2d.contiguous(), weight, idx, bias, scatter=True), x)
    y2d = x2d.new_zeros(x2d.shape[0], weight.shape[0])
    y2d.index_copy_(1, idx, _rows_values(x2d, weight, idx, bias))
    return _unflat(y2d, x)


def _cols_linear_impl(x: Tensor, weight: Tensor, idx: Tensor) -> Tensor:
    checks.check_cols_kept("cols_linear", x, weight, idx)
    kernels = _kernels_for(x.device, x.dtype)
    if kernels is not None:
        return _unflat(kernels.cols_gemm(_flat(x).contiguous(), weight, idx), x)
    return _unflat(torch.mm(_flat(x), weight.index_select(1, idx).t()), x)


def _cols_linear_gather_impl(x: Tensor, weight: Tensor, idx: Tensor) -> Tensor:
    checks.check_cols_full("cols_linear_gather", x, weight, idx)
    x_kept = _flat(x).index_select(1, idx)
    kernels = _kernels_for(x.device, x.dtype)
    if kernels is not None:
        return _unflat(kernels.cols_gemm(x_kept, weight, idx), x)
    return _unflat(torch.mm(x_kept, weight.index_select(1, idx).t()), x)


def _rows_linear_dx_impl(grad: Tensor, weight: Tensor, idx: Tensor, in_features: int) -> Tensor:
    checks.check_rows_dx(grad, weight, idx, in_features)
    kernels = _kernels_for(grad.device, grad.dtype)
    if kernels is not None:
        return _unflat(kernels.rows_gemm_dx(_flat(grad).contiguous(), weight, idx), grad)
    return _unflat(torch.mm(_flat(grad), weight.index_select(0, idx)), grad)


def _cols_linear_dx_impl(grad: Tensor, weight: Tensor, idx: Tensor) -> Tensor:
    checks.check_cols_dx(grad, weight, idx)
    kernels = _kernels_for(grad.device, grad.dtype)
    if kernels is not None:
        return _unflat(kernels.cols_gemm_dx(_flat(grad).contiguous(), weight, idx), grad)
    return _unflat(torch.mm(_flat(grad), weight.index_select(1, idx)), grad)


# --------------------------------------------------------------------------- fake kernels
# Same checks as the real kernels, so a bad call fails at compile time with the same message.


def _rows_linear_fake(x: Tensor, weight: Tensor, idx: Tensor, bias: Optional[Tensor]) -> Tensor:
    checks.check_rows("rows_linear", x, weight, idx, bias)
    return x.new_empty((*x.shape[:-1], idx.shape[0]))


def _rows_linear_scatter_fake(
    x: Tensor, weight: Tensor, idx: Tensor, bias: Optional[Tensor]
) -> Tensor:
    checks.check_rows("rows_linear_scatter", x, weight, idx, bias)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _cols_linear_fake(x: Tensor, weight: Tensor, idx: Tensor) -> Tensor:
    checks.check_cols_kept("cols_linear", x, weight, idx)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _cols_linear_gather_fake(x: Tensor, weight: Tensor, idx: Tensor) -> Tensor:
    checks.check_cols_full("cols_linear_gather", x, weight, idx)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _rows_linear_dx_fake(grad: Tensor, weight: Tensor, idx: Tensor, in_features: int) -> Tensor:
    checks.check_rows_dx(grad, weight, idx, in_features)
    return grad.new_empty((*grad.shape[:-1], in_features))


def _cols_linear_dx_fake(grad: Tensor, weight: Tensor, idx: Tensor) -> Tensor:
    checks.check_cols_dx(grad, weight, idx)
    return grad.new_empty((*grad.shape[:-1], idx.shape[0]))


# --------------------------------------------------------------------------- autograd


def _setup_frozen(op: str) -> Callable[..., None]:
    """setup_context that refuses a trainable base weight/bias and saves only (weight, idx)."""

    def setup_context(ctx: Any, inputs: Sequence[Any], output: Tensor) -> None:
        for name, value in zip(("weight", "idx", "bias"), inputs[1:]):
            if isinstance(value, Tensor) and value.requires_grad:
                checks.fail(op, f"{name} requires grad, but these ops treat the base layer as frozen "
                      "and give a gradient for x only",
                      "Freeze the base weight and bias (requires_grad_(False), as LoRA does); "
                      "sparselora-fx never rewrites a layer whose base weight is trainable.")
        ctx.save_for_backward(inputs[1], inputs[2])

    return setup_context


def _rows_linear_backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], None, None, None]:
    weight, idx = ctx.saved_tensors
    return rows_linear_dx(grad, weight, idx, weight.shape[1]), None, None, None


def _rows_linear_scatter_backward(
    ctx: Any, grad: Tensor
) -> tuple[Optional[Tensor], None, None, None]:
    weight, idx = ctx.saved_tensors
    grad_kept = grad.index_select(-1, idx)
    return rows_linear_dx(grad_kept, weight, idx, weight.shape[1]), None, None, None


def _cols_linear_backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], None, None]:
    weight, idx = ctx.saved_tensors
    return cols_linear_dx(grad, weight, idx), None, None


def _cols_linear_gather_backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], None, None]:
    weight, idx = ctx.saved_tensors
    dx_kept = cols_linear_dx(grad, weight, idx)
    # Zeros outside idx; index_add (not copy) keeps the gradient exact even for repeated indices.
    zeros = dx_kept.new_zeros((*dx_kept.shape[:-1], weight.shape[1]))
    return zeros.index_add(-1, idx, dx_kept), None, None


def _rows_linear_dx_backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], None, None, None]:
    # rows_linear_dx is linear in its input: its adjoint is rows_linear without bias.
    weight, idx = ctx.saved_tensors
    return rows_linear(grad, weight, idx, None), None, None, None


def _cols_linear_dx_backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], None, None]:
    weight, idx = ctx.saved_tensors
    return cols_linear(grad, weight, idx), None, None


# --------------------------------------------------------------------------- FLOP formulas
# Only the GEMM is counted (2 * M * N * K), as torch counts addmm; gathers are memory traffic.


def _leading(shape: Sequence[int]) -> int:
    return math.prod(shape[:-1])


def _flops_rows(x_shape: Sequence[int], weight_shape: Sequence[int], idx_shape: Sequence[int],
                *args: Any, **kwargs: Any) -> int:
    return 2 * _leading(x_shape) * idx_shape[0] * weight_shape[1]


def _flops_cols(x_shape: Sequence[int], weight_shape: Sequence[int], idx_shape: Sequence[int],
                *args: Any, **kwargs: Any) -> int:
    return 2 * _leading(x_shape) * idx_shape[0] * weight_shape[0]


# --------------------------------------------------------------------------- registration


@dataclass(frozen=True)
class _Spec:
    name: str
    impl: Callable[..., Tensor]
    fake: Callable[..., Tensor]
    backward: Callable[..., tuple[Optional[Tensor], ...]]
    flops: Callable[..., int]


_SPECS = (
    _Spec("rows_linear", _rows_linear_impl, _rows_linear_fake, _rows_linear_backward, _flops_rows),
    _Spec("rows_linear_scatter", _rows_linear_scatter_impl, _rows_linear_scatter_fake,
          _rows_linear_scatter_backward, _flops_rows),
    _Spec("cols_linear", _cols_linear_impl, _cols_linear_fake, _cols_linear_backward, _flops_cols),
    _Spec("cols_linear_gather", _cols_linear_gather_impl, _cols_linear_gather_fake,
          _cols_linear_gather_backward, _flops_cols),
    _Spec("rows_linear_dx", _rows_linear_dx_impl, _rows_linear_dx_fake,
          _rows_linear_dx_backward, _flops_rows),
    _Spec("cols_linear_dx", _cols_linear_dx_impl, _cols_linear_dx_fake,
          _cols_linear_dx_backward, _flops_cols),
)
assert tuple(s.name for s in _SPECS) == OPS


def _is_registered(name: str) -> bool:
    return hasattr(getattr(torch.ops, NAMESPACE), name)


def _register(spec: _Spec) -> Any:
    """Define one op with its fake kernel, autograd formula and FLOP formula."""
    opdef = torch.library.custom_op(f"{NAMESPACE}::{spec.name}", spec.impl, mutates_args=())
    opdef.register_fake(spec.fake)
    opdef.register_autograd(spec.backward, setup_context=_setup_frozen(spec.name))
    register_flop_formula(getattr(getattr(torch.ops, NAMESPACE), spec.name))(spec.flops)
    return opdef


# Registration lives in the dispatcher, which outlives this module: a reload (or a second copy
# of the module) finds the ops there and must not define them again.
_OPDEFS = {_spec.name: _register(_spec) for _spec in _SPECS if not _is_registered(_spec.name)}
#: The ops this import defined (name -> CustomOpDef); ``passes/lower.py`` attaches the CUDA Triton swap to them.
OPDEFS = _OPDEFS

_ops = getattr(torch.ops, NAMESPACE)


# --------------------------------------------------------------------------- public API


def rows_linear(x: Tensor, weight: Tensor, idx: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """`x @ weight[idx].T + bias[idx]` -> [..., k]: only the kept output channels are computed.

    Used where the next op consumes the narrow output directly (gate/up/fc1 of an MLP).
    """
    return _ops.rows_linear(x, weight, idx, bias)


def rows_linear_scatter(
    x: Tensor, weight: Tensor, idx: Tensor, bias: Optional[Tensor] = None
) -> Tensor:
    """Like `rows_linear`, but written at columns `idx` of a zero [..., out] output.

    Used where a full-width tensor is needed (q/k/v: the dense LoRA output is added to it).
    """
    return _ops.rows_linear_scatter(x, weight, idx, bias)


def cols_linear(x: Tensor, weight: Tensor, idx: Tensor) -> Tensor:
    """`x @ weight[:, idx].T` -> [..., out], where x holds only the kept input channels.

    Used after a rows_linear (down/fc2): the sparsity of the input is already in its width.
    A bias, if any, is added by the caller.
    """
    return _ops.cols_linear(x, weight, idx)


def cols_linear_gather(x: Tensor, weight: Tensor, idx: Tensor) -> Tensor:
    """`x[..., idx] @ weight[:, idx].T` -> [..., out] from a full-width input.

    Used where the input stays full width (o_proj after attention) but only the kept
    channels are read; its input gradient is zero outside idx.
    """
    return _ops.cols_linear_gather(x, weight, idx)


def rows_linear_dx(grad: Tensor, weight: Tensor, idx: Tensor, in_features: int) -> Tensor:
    """`grad @ weight[idx]` -> [..., in]: input gradient of rows_linear, as its own op.

    An op (not inline torch code) so that backward FLOPs are counted and CUDA runs the same
    gather-GEMM kernel without materialising `weight[idx]`.
    """
    return _ops.rows_linear_dx(grad, weight, idx, in_features)


def cols_linear_dx(grad: Tensor, weight: Tensor, idx: Tensor) -> Tensor:
    """`grad @ weight[:, idx]` -> [..., k]: input gradient of cols_linear, as its own op.

    An op for the same reasons as `rows_linear_dx`.
    """
    return _ops.cols_linear_dx(grad, weight, idx)
