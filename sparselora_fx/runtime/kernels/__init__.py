"""Triton gather-GEMM kernels for the frozen-weight sparse linears.

Why a package of its own: the rest of sparselora-fx must import and run (dense
or torch fallbacks) on machines without triton, so triton is only ever imported
behind a guard. `HAS_TRITON` says whether the import worked; `kernels_enabled`
says whether the custom ops should route a given device to these kernels.
"""

from __future__ import annotations

import os

import torch

from .errors import KernelInputError, KernelUnavailableError
from .gather_gemm import (
    cols_gemm,
    cols_gemm_dx,
    rows_gemm,
    rows_gemm_dx,
    transpose_weight,
    transposed_weight_bytes,
)

try:  # triton is optional: an extra, absent on CPU-only installs.
    import triton as _triton  # noqa: F401

    HAS_TRITON: bool = True
except Exception:  # ImportError, or a broken install that fails while importing
    HAS_TRITON = False

#: Environment switch that forces the torch fallback even where triton works.
DISABLE_ENV = "SPARSELORA_DISABLE_TRITON"


#: Environment switch, read when a graph is compiled: SPARSELORA_TRITON_LOWERING=0 keeps the ops
#: opaque under torch.compile (Inductor calls them as extern ops, which then launch the kernels).
LOWERING_ENV = "SPARSELORA_TRITON_LOWERING"


def _env_off(name: str, default: str) -> bool:
    return os.environ.get(name, default).strip().lower() in ("0", "false", "no", "off")


def lowering_enabled(device: torch.device) -> bool:
    """Whether torch.compile should put the kernels themselves into the graph on `device`.

    Why a switch of its own: it is decided once, while a graph is traced, whereas
    `kernels_enabled` is asked on every eager call; SPARSELORA_TRITON_LOWERING=0 compares
    the compiled kernel against the same kernel called as an extern op.
    """
    return kernels_enabled(device) and not _env_off(LOWERING_ENV, "1")


def kernels_enabled(device: torch.device) -> bool:
    """Whether tensors on `device` should use the Triton kernels.

    Why: the custom ops call this once per op to pick the Triton path or the
    plain-torch path. True only for CUDA devices with triton importable, and
    never when the environment sets SPARSELORA_DISABLE_TRITON=1 (an escape
    hatch for debugging or for a broken triton).
    """
    if not HAS_TRITON:
        return False
    if os.environ.get(DISABLE_ENV, "0").strip().lower() in ("1", "true", "yes", "on"):
        return False
    return torch.device(device).type == "cuda"


__all__ = [
    "DISABLE_ENV",
    "HAS_TRITON",
    "KernelInputError",
    "KernelUnavailableError",
    "LOWERING_ENV",
    "cols_gemm",
    "cols_gemm_dx",
    "kernels_enabled",
    "lowering_enabled",
    "rows_gemm",
    "rows_gemm_dx",
    "transpose_weight",
    "transposed_weight_bytes",
]
