"""Input checks shared by the gather-GEMM wrappers.

Why a module of its own: the four wrappers take the same kinds of tensors
(a 2-D activation, the frozen weight, an index vector, optional bias/out) and
must reject bad ones with the same clear messages before a kernel reads
memory it does not own.
"""

from __future__ import annotations

from typing import Optional

import torch

from .errors import KernelInputError

#: Dtypes the kernels accept; accumulation is always fp32.
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def matrix(op: str, name: str, t: object, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Check `t` is a 2-D floating tensor of a supported (and, if given, the expected) dtype."""
    if not isinstance(t, torch.Tensor):
        raise KernelInputError(f"{op}: `{name}` must be a torch.Tensor, got {type(t).__name__}.")
    if t.dim() != 2:
        raise KernelInputError(
            f"{op}: `{name}` must be 2-D, got shape {tuple(t.shape)}; flatten leading dims first "
            f"(e.g. `{name}.reshape(-1, {name}.shape[-1])`)."
        )
    if t.dtype not in SUPPORTED_DTYPES:
        raise KernelInputError(
            f"{op}: `{name}` has dtype {t.dtype}; the kernels support float16, bfloat16 and float32 "
            f"(cast it, or use the torch fallback)."
        )
    if dtype is not None and t.dtype != dtype:
        raise KernelInputError(
            f"{op}: `{name}` has dtype {t.dtype} but the activation is {dtype}; "
            f"all operands must share one dtype (cast `{name}` to {dtype})."
        )
    return t


def index(op: str, idx: object, device: torch.device) -> torch.Tensor:
    """Check `idx` is a 1-D integer index on `device`; return it as contiguous int64."""
    if not isinstance(idx, torch.Tensor):
        raise KernelInputError(f"{op}: `idx` must be a torch.Tensor, got {type(idx).__name__}.")
    if idx.dim() != 1:
        raise KernelInputError(f"{op}: `idx` must be 1-D, got shape {tuple(idx.shape)}.")
    if idx.dtype not in (torch.int64, torch.int32):
        raise KernelInputError(f"{op}: `idx` must be int64 (or int32), got {idx.dtype}.")
    same_device(op, "idx", idx, device)
    return idx.to(torch.int64).contiguous()


def same_device(op: str, name: str, t: torch.Tensor, device: torch.device) -> None:
    """Every operand must live where the activation lives."""
    if t.device != device:
        raise KernelInputError(
            f"{op}: `{name}` is on {t.device} but the activation is on {device}; move it with "
            f"`.to({str(device)!r})`."
        )


def dim_match(op: str, what_a: str, a: int, what_b: str, b: int) -> None:
    """Two sizes that the op contracts or pairs must agree."""
    if a != b:
        raise KernelInputError(f"{op}: {what_a} = {a} but {what_b} = {b}; they must be equal.")


def vector(op: str, name: str, t: object, length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Check an optional 1-D operand such as a bias; return it contiguous."""
    if not isinstance(t, torch.Tensor):
        raise KernelInputError(f"{op}: `{name}` must be a torch.Tensor or None, got {type(t).__name__}.")
    if t.dim() != 1 or t.shape[0] != length:
        raise KernelInputError(f"{op}: `{name}` must have shape ({length},), got {tuple(t.shape)}.")
    if t.dtype != dtype:
        raise KernelInputError(f"{op}: `{name}` has dtype {t.dtype}; cast it to the activation dtype {dtype}.")
    same_device(op, name, t, device)
    return t.contiguous()


def output(
    op: str, out: Optional[torch.Tensor], shape: tuple[int, int], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Return `out` after checking it can hold the result, or a fresh uninitialised buffer."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if not isinstance(out, torch.Tensor):
        raise KernelInputError(f"{op}: `out` must be a torch.Tensor or None, got {type(out).__name__}.")
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype:
        raise KernelInputError(
            f"{op}: `out` must be a {dtype} tensor of shape {tuple(shape)}, got {out.dtype} {tuple(out.shape)}."
        )
    same_device(op, "out", out, device)
    if not out.is_contiguous():
        raise KernelInputError(f"{op}: `out` must be contiguous; pass a fresh `torch.empty` buffer.")
    return out


def index_range(op: str, idx: torch.Tensor, limit: int, what: str) -> None:
    """Bounds-check `idx` against `limit` (a device sync: debug / test use only)."""
    if idx.numel() == 0:
        return
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= limit:
        raise KernelInputError(
            f"{op}: `idx` holds values in [{lo}, {hi}] but must lie in [0, {limit}) ({what}); "
            f"negative indices are not wrapped."
        )
