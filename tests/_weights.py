"""Weights with a known spectrum, shared by the estimator and factor-cache tests."""

from __future__ import annotations

import torch


def low_rank_weight(out_f: int, in_f: int, seed: int, decay: float = 0.7) -> torch.Tensor:
    """A weight with a decaying spectrum, so a rank-k approximation is well defined."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out_f, min(out_f, in_f), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(in_f, min(out_f, in_f), generator=g, dtype=torch.float64))
    s = decay ** torch.arange(min(out_f, in_f), dtype=torch.float64)
    return ((u * s) @ v.t()).float()
