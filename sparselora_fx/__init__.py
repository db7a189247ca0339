"""sparselora-fx: SparseLoRA as a torch.compile backend."""

from __future__ import annotations

from .errors import OptionsError, PolicyError, SparseLoRAError, UnsupportedGraphError

__version__ = "0.1.0"

__all__ = [
    "OptionsError",
    "PolicyError",
    "SparseLoRAError",
    "UnsupportedGraphError",
    "__version__",
]
