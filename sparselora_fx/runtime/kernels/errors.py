"""Errors raised by the gather-GEMM kernels.

They live here (not in `sparselora_fx/errors.py`) so the kernel package stays
self-contained; both subclass `SparseLoRAError`, so `except SparseLoRAError`
catches them like every other error of the package.
"""

from __future__ import annotations

from ...errors import SparseLoRAError


class KernelInputError(SparseLoRAError, ValueError):
    """A tensor handed to a gather-GEMM wrapper has the wrong shape, dtype or device."""


class KernelUnavailableError(SparseLoRAError, RuntimeError):
    """The Triton kernels cannot run here (no triton, or CPU tensors without the interpreter)."""
