"""Autotune block-size lists for the gather-GEMM kernels.

Why a module of its own: the lists are plain data (no triton import), so they
can be read, tested and tuned without a GPU; `gather_gemm` turns them into
`triton.Config` objects when it builds the kernels.

Three lists: a few tiles suited to Hopper (H100/H200: 228 KB shared memory,
wgmma wants BLOCK_M >= 64) for real runs, and a single tiny tile for the
Triton interpreter (TRITON_INTERPRET=1), where every extra config is a full
Python-speed re-run and only correctness matters; and one safe tile for
real runs with autotuning switched off (SPARSELORA_TRITON_AUTOTUNE=0).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TileConfig:
    """One autotune candidate: block sizes along M (tokens), P (outputs), R (reduction)."""

    block_m: int
    block_p: int
    block_r: int
    num_warps: int
    num_stages: int
    group_m: int = 8

    def smem_bytes(self, elem_bytes: int) -> int:
        """Shared memory the pipelined A and B tiles need, to prune configs that cannot fit."""
        return self.num_stages * (self.block_m * self.block_r + self.block_r * self.block_p) * elem_bytes


#: Candidates for Hopper-class GPUs, bf16/fp16 first; fp32 drops those over budget.
#: The two 64-wide-P tiles are for few kept channels: at MLP sparsity 0.99 a gate/up GEMM keeps
#: 143 of 14336 outputs, and 128x128 tiles over 4096 tokens make only 64 CTAs for 132 SMs.
HOPPER_CONFIGS: tuple[TileConfig, ...] = (
    TileConfig(128, 256, 64, num_warps=8, num_stages=3),
    TileConfig(128, 128, 64, num_warps=8, num_stages=4),
    TileConfig(128, 128, 32, num_warps=4, num_stages=4),
    TileConfig(64, 128, 64, num_warps=4, num_stages=4),
    TileConfig(128, 64, 64, num_warps=4, num_stages=4),
    TileConfig(64, 64, 64, num_warps=4, num_stages=4),
)

#: The one tile used when autotuning is switched off: fits shared memory for every dtype.
DEFAULT_CONFIGS: tuple[TileConfig, ...] = (TileConfig(64, 64, 32, num_warps=4, num_stages=3),)

#: The one tile the interpreter runs: smallest `tl.dot` allows, so masks get exercised.
INTERPRETER_CONFIGS: tuple[TileConfig, ...] = (TileConfig(16, 32, 16, num_warps=1, num_stages=1, group_m=2),)

#: Shared-memory budget used for pruning (Hopper allows 227 KB per block; keep headroom).
SMEM_BUDGET_BYTES = 200 * 1024


def fitting(configs: list[TileConfig], elem_bytes: int) -> list[TileConfig]:
    """The candidates whose tiles fit the shared-memory budget for this element size.

    Why separate from `prune`: the compiled (Inductor) path knows the dtype when it traces but
    not the token count, which may be symbolic; it autotunes over these.
    """
    return [c for c in configs if c.smem_bytes(elem_bytes) <= SMEM_BUDGET_BYTES]


def prune(configs: list[TileConfig], m: int, elem_bytes: int) -> list[TileConfig]:
    """Drop candidates that cannot fit or are pointless for this problem, keeping at least one.

    Why: every candidate costs a compile plus a benchmark on first use; fp32
    tiles that overflow shared memory would fail anyway, and 128-row tiles for
    a handful of tokens waste most of the tile.
    """
    kept = fitting(configs, elem_bytes)
    if m <= 64:
        kept = [c for c in kept if c.block_m <= 64] or kept
    if not kept:
        kept = [min(configs, key=lambda c: c.smem_bytes(elem_bytes))]
    return kept
