"""One family of errors, so users can catch ours and nothing else.

Every message says what was wrong, where, and how to fix it.
"""

from __future__ import annotations


class SparseLoRAError(Exception):
    """Base class of every error sparselora-fx raises on purpose."""


class OptionsError(SparseLoRAError, ValueError):
    """A `torch.compile(..., options=...)` key or value the backend cannot use."""


class PolicyError(SparseLoRAError, ValueError):
    """A sparsity policy (file, preset or object) that cannot be used."""


class UnsupportedGraphError(SparseLoRAError):
    """A graph shape the passes cannot prove safe; callers fall back to dense."""
