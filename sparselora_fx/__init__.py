"""sparselora-fx: SparseLoRA as a torch.compile backend.

``torch.compile(model, backend="sparselora", options={"policy": ...})`` finds the frozen
linear + LoRA units of any Dynamo-traced model, groups them by dataflow, and computes only the
channels an estimator predicts to matter, forward and backward. ``explain`` shows what it found.
"""

from __future__ import annotations

from .errors import OptionsError, PolicyError, SparseLoRAError, UnsupportedGraphError
from .explain import explain
from .factor_cache import refresh_factors
from .policy import Policy
from .report import Report

__version__ = "0.1.0"

__all__ = [
    "OptionsError",
    "Policy",
    "PolicyError",
    "Report",
    "SparseLoRAError",
    "UnsupportedGraphError",
    "__version__",
    "explain",
    "refresh_factors",
]


def _register_backend() -> None:
    from .backend import register

    register()


_register_backend()
