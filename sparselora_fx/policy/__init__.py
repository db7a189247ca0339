"""The sparsity policy: which layers go sparse, how much, and with which estimator.

A package split by job; this file only re-exports. Imports run one way, no cycles, none deferred:
matching <- values <- writing <- rules <- reading (<- presets) <- importers <- model; Policy's
classmethods delegate down, handing over the class to build. See policy/model.py. checking (which
rules a compiled graph proves select nothing; the plan pass asks it) sits beside model, on rules.
"""

from __future__ import annotations

from .checking import GraphNames, PolicyWarning, UnmatchedRule, UnmatchedRuleError
from .matching import (
    DEFAULT_LAYER_STACK,
    layer_index,
    normalize_module_name,
    pattern_head,
    pattern_layer_stack,
    regex_hazard,
)
from .model import Policy, PolicyLike
from .rules import Rule
from .values import (
    DEFAULT_DENSE_TOKENS,
    DEFAULT_ESTIMATORS,
    DEFAULT_SVD_RANK,
    DEFAULT_TOKEN_SAMPLES,
    DEFAULT_TOKEN_SEED,
    GROUP_KINDS,
    POLICY_KINDS,
    TOKEN_MODES,
    EstimatorSpec,
    Ramp,
    SparsityValue,
    describe_estimator,
)

__all__ = [
    "EstimatorSpec",
    "Policy",
    "PolicyWarning",
    "Ramp",
    "Rule",
    "UnmatchedRuleError",
    "layer_index",
    "normalize_module_name",
]
