"""A policy rule: which modules it selects (patterns, layers) and what it sets for them.

Below the readers and `Policy` in the package's flow: policy/reading.py and policy/importers.py
build rules from files, policy/model.py asks them whether they match a module name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import PolicyError
from .matching import _candidates, _pattern_matches, layer_index, normalize_module_name
from .values import (
    POLICY_KINDS,
    SparsityValue,
    _err,
    _layers_text,
    _parse_layers,
    _parse_match,
    _parse_sparsity,
)
from .writing import rule_to_dict

__all__ = ["Rule"]


@dataclass(frozen=True)
class Rule:
    """One ordered policy rule: which modules it selects and what it sets for them.

    Why: per-layer settings are the paper's main lever (shallow and last layers dense, deep
    layers sparse). A rule selects modules by `match` patterns (exact name, glob, `re:` regex;
    matched against the name and each dotted parent) and/or a `layers` selector (both must
    hold when both are given), and sets per-kind sparsities or `dense = True` for every kind.
    """

    match: tuple[str, ...] = ()
    layers: tuple[tuple[int, int], ...] = ()
    mlp: SparsityValue | None = None
    attn_qk: SparsityValue | None = None
    attn_vo: SparsityValue | None = None
    dense: bool = False

    def __post_init__(self) -> None:
        where = f"Rule(match={self.match!r})"
        object.__setattr__(self, "match", _parse_match(self.match, where))
        object.__setattr__(self, "layers", _parse_layers(self.layers, where))
        for kind in POLICY_KINDS:
            object.__setattr__(self, kind, _parse_sparsity(getattr(self, kind), where, kind))
        if not isinstance(self.dense, bool):
            raise _err(where, f"dense must be true or false, got {self.dense!r}.")
        if not self.match and not self.layers:
            raise _err(where, "a rule needs `match` patterns, a `layers` selector, or both.")
        sets = [k for k in POLICY_KINDS if getattr(self, k) is not None]
        if self.dense and sets:
            raise _err(
                where,
                f"dense = true already makes every kind dense; remove {', '.join(sets)} "
                "or drop `dense`.",
            )
        if not self.dense and not sets:
            raise _err(
                where,
                "the rule sets nothing; give a sparsity (mlp, attn, attn_qk, attn_vo) "
                "or dense = true.",
            )

    @property
    def key(self) -> tuple[tuple[str, ...], tuple[tuple[int, int], ...]]:
        """What the rule selects; two rules with the same key are duplicates."""
        return (self.match, self.layers)

    def sets(self, kind: str) -> bool:
        """Whether this rule decides `kind` (a policy key) for the modules it matches."""
        return self.dense or getattr(self, kind) is not None

    def value(self, kind: str) -> SparsityValue | None:
        """The value the rule sets for `kind`; None when dense."""
        return None if self.dense else getattr(self, kind)

    def matches(self, name: str, num_layers: int | None = None) -> bool:
        """Whether the rule selects module `name` (any spelling; parents count)."""
        normalized = normalize_module_name(name)
        return self._matches(normalized, _candidates(normalized), layer_index(normalized), num_layers)

    def _matches(
        self, normalized: str, cands: Sequence[str], index: int | None, num_layers: int | None
    ) -> bool:
        if self.match and not any(_pattern_matches(p, normalized, cands) for p in self.match):
            return False
        if self.layers:
            if index is None:
                return False
            return self._layer_selected(index, num_layers)
        return True

    def _layer_selected(self, index: int, num_layers: int | None) -> bool:
        for start, stop in self.layers:
            if start < 0:
                if num_layers is None:
                    raise PolicyError(
                        f"Rule(match={self.match!r}, layers={_layers_text(self.layers)!r}): "
                        f"layer {start} counts from the end, so the number of layers must be "
                        "known; call policy.bind(num_layers=N) (or bind(names=...)), pass "
                        "resolve(..., num_layers=N), or set num_layers in [defaults]."
                    )
                start = stop = num_layers + start
            if start <= index <= stop:
                return True
        return False

    def to_dict(self) -> dict[str, Any]:
        """The TOML table form of the rule."""
        return rule_to_dict(self)
