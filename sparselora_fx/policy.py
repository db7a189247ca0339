"""The sparsity policy: which layers go sparse, how much, and with which estimator.

A policy is data, not code: a TOML (or JSON) file, a bundled preset, or a `Policy` built in
Python. The graph passes ask it one question per dataflow group -- `resolve(name, kind)` -- and
get back `None` (dense) or the fraction of channels to DROP. Everything a user may tune about
*where* sparsity applies lives here; see docs/policy.md for the guide.

Layout of this module: constants and name handling, value types (`Ramp`, `EstimatorSpec`,
`Rule`), parsing helpers with error locations, `Policy`, the TOML emitter, the importers for the
reference release's files.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.resources
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from fractions import Fraction
from pathlib import Path
from typing import Any, Union

from .runtime.estimators import describe_estimator
from .errors import PolicyError
from .names import BASE_LAYER_SUFFIX as _BASE_LAYER_SUFFIX
from .names import PEFT_PREFIX as _PEFT_PREFIX
from .names import normalize_module_name

__all__ = [
    "EstimatorSpec",
    "Policy",
    "Ramp",
    "Rule",
    "layer_index",
    "normalize_module_name",
]

# --------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------

#: The sparsity keys a policy stores, one per group kind family.
POLICY_KINDS: tuple[str, ...] = ("mlp", "attn_qk", "attn_vo")

#: Group kinds the graph passes use, mapped to the policy key that governs them.
GROUP_KINDS: dict[str, str] = {
    "gated_mlp": "mlp",
    "mlp": "mlp",
    "attn_qk": "attn_qk",
    "attn_vo": "attn_vo",
}

TOKEN_MODES: tuple[str, ...] = ("output_dense", "all_sparse")
ESTIMATOR_KINDS: tuple[str, ...] = ("svd", "token_sample", "random")
_ESTIMATOR_PARAMS: dict[str, tuple[str, ...]] = {
    "svd": ("kind", "rank"),
    "token_sample": ("kind", "samples", "seed", "fraction"),
    "random": ("kind", "seed"),
}
DEFAULT_SVD_RANK = 8
DEFAULT_TOKEN_SAMPLES = 64
DEFAULT_TOKEN_SEED = 0
#: tokens = "output_dense": the dense-token budget per micro-batch (a fraction of its tokens).
DEFAULT_DENSE_TOKENS = 0.25

_TOP_KEYS = ("description", "defaults", "rules")
_DEFAULTS_KEYS = (
    "mlp",
    "attn",
    "attn_qk",
    "attn_vo",
    "estimator",
    "warmup_steps",
    "warmup_fraction",
    "total_steps",
    "tokens",
    "dense_tokens",
    "num_layers",
)
_RULE_KEYS = ("match", "layers", "mlp", "attn", "attn_qk", "attn_vo", "dense")
_ESTIMATOR_KIND_KEYS = ("mlp", "attn", "attn_qk", "attn_vo")

# --------------------------------------------------------------------------------------------
# Module names
# --------------------------------------------------------------------------------------------

def layer_index(name: str) -> int | None:
    """The layer index of a module: its first purely numeric dotted component, or None.

    Why: `layers` selectors and depth ramps need a layer number; in transformers models the
    decoder stack is the first numbered container (`model.layers.3...`, `transformer.h.3...`).
    """
    for part in normalize_module_name(name).split("."):
        if part.isdigit():
            return int(part)
    return None


def _prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _candidates(normalized: str) -> list[str]:
    """Every spelling of a name (and its parents) a pattern may be written against."""
    prefixes = _prefixes(normalized)
    cands = list(prefixes)
    cands += [_PEFT_PREFIX + p for p in prefixes]
    cands += [normalized + _BASE_LAYER_SUFFIX, _PEFT_PREFIX + normalized + _BASE_LAYER_SUFFIX]
    return cands


@functools.lru_cache(maxsize=1024)
def _compile_pattern(pattern: str) -> tuple[str, Any]:
    """('re', compiled) for `re:` patterns, ('glob', normalized) or ('exact', normalized)."""
    if pattern.startswith("re:"):
        return "re", re.compile(pattern[3:])
    if any(ch in pattern for ch in "*?["):
        return "glob", normalize_module_name(pattern)
    return "exact", normalize_module_name(pattern)


def _pattern_matches(pattern: str, normalized: str, cands: Sequence[str] | None = None) -> bool:
    how, pat = _compile_pattern(pattern)
    if how == "re":
        return any(pat.fullmatch(c) for c in (cands if cands is not None else _candidates(normalized)))
    prefixes = _prefixes(normalized)
    if how == "exact":
        return pat in prefixes
    return any(fnmatchcase(p, pat) for p in prefixes)


# --------------------------------------------------------------------------------------------
# Per-layer compiles: names without a layer index, read as the names of one layer
# --------------------------------------------------------------------------------------------

#: The layer stack a per-layer unit is placed in when no match pattern names one.
DEFAULT_LAYER_STACK = "layers"
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_INDEX_SAMPLES = tuple(str(n) for n in range(128))


@functools.lru_cache(maxsize=1024)
def pattern_layer_stack(pattern: str) -> str | None:
    """The module path a pattern puts before a layer index, or None when it names no layer.

    Why: a per-layer compile sees `mlp.gate_proj`, not `model.layers.3.mlp.gate_proj`; to match
    `model.layers.*.mlp` (or `re:model\\.layers\\.(1[4-9])\\.mlp`) the unit is read as
    `<stack>.<layer>.mlp.gate_proj` with the stack the policy itself writes (`model.layers`).
    """
    if pattern.startswith("re:"):
        parts = re.split(r"\\?\.", pattern[3:])
        is_index = _regex_matches_an_index
    else:
        parts = normalize_module_name(pattern).split(".")
        is_index = _glob_matches_an_index
    stack: list[str] = []
    for part in parts:
        if _IDENTIFIER.fullmatch(part):
            stack.append(part)
            continue
        return ".".join(stack) if stack and is_index(part) else None
    return None


def _glob_matches_an_index(part: str) -> bool:
    return part.isdigit() or any(fnmatchcase(n, part) for n in _INDEX_SAMPLES)


def _regex_matches_an_index(part: str) -> bool:
    try:
        compiled = re.compile(part)
    except re.error:  # a component cut out of a larger group: not a layer slot we can read
        return False
    return any(compiled.fullmatch(n) for n in _INDEX_SAMPLES)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def _err(where: str, message: str) -> PolicyError:
    return PolicyError(f"{where}: {message}")


def _unknown_key(where: str, key: str, valid: Sequence[str], hint: str = "") -> PolicyError:
    close = difflib.get_close_matches(str(key), list(valid), n=1)
    suggestion = f" Did you mean {close[0]!r}?" if close else ""
    return _err(
        where,
        f"unknown key {key!r}.{suggestion} Valid keys here: {', '.join(valid)}.{hint}",
    )


def _check_keys(
    table: Mapping[str, Any],
    valid: Sequence[str],
    where: str,
    hint: Callable[[str], str] | None = None,
) -> None:
    for key in table:
        if key not in valid:
            raise _unknown_key(where, key, valid, hint(key) if hint else "")


# --------------------------------------------------------------------------------------------
# Value types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ramp:
    """A sparsity that rises linearly with depth: `lo` at layer 0, `hi` at the last layer.

    Why: a static file cannot know a model's depth; a ramp states the intent ("shallow layers
    light, deep layers heavy") and becomes a number once `num_layers` is known
    (`Policy.bind(...)` or `resolve(..., num_layers=)`). Layer i of N gets
    `lo + (hi - lo) * i / (N - 1)`.
    """

    lo: float
    hi: float

    def __post_init__(self) -> None:
        where = f"Ramp({self.lo!r}, {self.hi!r})"
        object.__setattr__(self, "lo", _check_fraction(self.lo, where, "lo"))
        object.__setattr__(self, "hi", _check_fraction(self.hi, where, "hi"))

    def at(self, index: int, num_layers: int) -> float:
        """The sparsity at layer `index` of `num_layers`."""
        if num_layers <= 1:
            return self.lo
        return self.lo + (self.hi - self.lo) * index / (num_layers - 1)


SparsityValue = Union[float, Ramp]


@dataclass(frozen=True)
class EstimatorSpec:
    """Which estimator scores channels for a group kind, and its parameters.

    Why: the runtime needs one small, hashable description per group kind. Kinds: `svd`
    (rank-`rank` factors of the frozen weight, default rank 8), `token_sample` (scores from
    `samples` tokens drawn with `seed`, defaults 64 and 0; with `fraction`, max(samples,
    floor(fraction * tokens)) so the cost stays a fixed share of the micro-batch's GEMMs) and
    `random` (random channels each step: a baseline for accuracy studies, not for training).
    Parameters that do not belong to the kind must stay None.
    """

    kind: str = "svd"
    rank: int | None = None
    samples: int | None = None
    seed: int | None = None
    fraction: float | None = None

    def __post_init__(self) -> None:
        where = f"EstimatorSpec(kind={self.kind!r})"
        if self.kind not in ESTIMATOR_KINDS:
            close = difflib.get_close_matches(str(self.kind), ESTIMATOR_KINDS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise _err(
                where,
                f"unknown estimator kind {self.kind!r}.{hint} "
                f"Valid kinds: {', '.join(ESTIMATOR_KINDS)}.",
            )
        allowed = _ESTIMATOR_PARAMS[self.kind]
        for param in ("rank", "samples", "seed", "fraction"):
            value = getattr(self, param)
            if value is None:
                continue
            if param not in allowed:
                raise _err(
                    where,
                    f"parameter {param!r} does not apply to estimator kind {self.kind!r}; "
                    f"its parameters are: {', '.join(allowed[1:])}.",
                )
            if param == "fraction":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
                    raise _err(where, f"fraction must be a number in (0, 1] (the share of a micro-batch's "
                                      f"tokens to sample), got {value!r}.")
                object.__setattr__(self, "fraction", float(value))
                continue
            minimum = 0 if param == "seed" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise _err(where, f"{param} must be an integer >= {minimum}, got {value!r}.")
        if self.kind == "svd" and self.rank is None:
            object.__setattr__(self, "rank", DEFAULT_SVD_RANK)
        if self.kind == "token_sample" and self.samples is None:
            object.__setattr__(self, "samples", DEFAULT_TOKEN_SAMPLES)
        if self.kind in ("token_sample", "random"):
            if self.seed is None:
                object.__setattr__(self, "seed", DEFAULT_TOKEN_SEED)

    def to_dict(self) -> dict[str, Any]:
        """The TOML inline-table form: kind and its set parameters."""
        return {k: getattr(self, k) for k in _ESTIMATOR_PARAMS[self.kind] if getattr(self, k) is not None}

    def describe(self) -> str:
        """Short text for tables: `svd:8`, `token_sample:64+3%`, `random`."""
        return describe_estimator(self.kind, self.rank, self.samples, self.fraction)


def _check_fraction(value: Any, where: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _err(where, f"{key} must be a number in [0, 1), got {value!r}.")
    value = float(value)
    if not 0.0 <= value < 1.0:
        raise _err(
            where,
            f"{key} = {value!r} is outside [0, 1): it is the fraction of channels DROPPED "
            "(0 = dense, 0.99 = keep 1%).",
        )
    return value


def _parse_sparsity(value: Any, where: str, key: str) -> SparsityValue | None:
    """A number in [0, 1), a Ramp, a `{ramp = [lo, hi]}` table, or None (not set)."""
    if value is None or isinstance(value, Ramp):
        return value
    if isinstance(value, Mapping):
        _check_keys(value, ("ramp",), f"{where}: {key}")
        pair = value.get("ramp")
        if not isinstance(pair, Sequence) or isinstance(pair, str) or len(pair) != 2:
            raise _err(where, f"{key}.ramp must be a list [lo, hi], got {pair!r}.")
        lo = _check_fraction(pair[0], where, f"{key}.ramp[0]")
        hi = _check_fraction(pair[1], where, f"{key}.ramp[1]")
        return Ramp(lo, hi)
    return _check_fraction(value, where, key)


def _parse_match(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, Sequence) or not all(isinstance(p, str) and p for p in items):
        raise _err(
            where,
            f"match must be a non-empty string or a list of them, got {value!r}.",
        )
    for pattern in items:
        try:
            _compile_pattern(pattern)
        except re.error as exc:
            raise _err(where, f"invalid regex in match {pattern!r}: {exc}.") from None
    return tuple(items)


_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")


def _parse_layers(value: Any, where: str) -> tuple[tuple[int, int], ...]:
    """Ints (negative counts from the end) and "a-b" inclusive ranges -> (start, stop) pairs."""
    if value is None:
        return ()
    items = [value] if isinstance(value, (int, str)) and not isinstance(value, bool) else value
    if not isinstance(items, Sequence) or isinstance(items, str):
        raise _err(where, f"layers must be an int, an \"a-b\" range or a list, got {value!r}.")
    out: list[tuple[int, int]] = []
    for item in items:
        if isinstance(item, bool):
            raise _err(where, f"layers entry {item!r} is not a layer number.")
        if isinstance(item, int):
            out.append((item, item))
            continue
        if isinstance(item, (tuple, list)) and len(item) == 2 and all(
            isinstance(x, int) and not isinstance(x, bool) for x in item
        ):
            start, stop = item
        elif isinstance(item, str) and item.strip().lstrip("-").isdigit():
            start = stop = int(item)
        elif isinstance(item, str) and (m := _RANGE.match(item)):
            start, stop = int(m.group(1)), int(m.group(2))
        else:
            raise _err(
                where,
                f"layers entry {item!r} is neither an int nor an \"a-b\" range "
                "(e.g. layers = [0, -1] or layers = [\"3-30\"]).",
            )
        if (start < 0) != (stop < 0) or (start >= 0 and start > stop) or (
            start < 0 and start != stop
        ):
            raise _err(
                where,
                f"layers range {item!r} is empty or mixes signs; write \"a-b\" with 0 <= a <= b, "
                "or a single negative int counted from the end.",
            )
        out.append((start, stop))
    return tuple(out)


def _layers_text(pairs: Sequence[tuple[int, int]]) -> list[Any]:
    return [a if a == b else f"{a}-{b}" for a, b in pairs]


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
        out: dict[str, Any] = {}
        if self.match:
            out["match"] = self.match[0] if len(self.match) == 1 else list(self.match)
        if self.layers:
            text = _layers_text(self.layers)
            out["layers"] = text[0] if len(text) == 1 else text
        out.update(_kinds_to_dict(self.mlp, self.attn_qk, self.attn_vo))
        if self.dense:
            out["dense"] = True
        return out


def _value_to_toml(value: SparsityValue) -> Any:
    if isinstance(value, Ramp):
        return {"ramp": [value.lo, value.hi]}
    return value


def _kinds_to_dict(
    mlp: SparsityValue | None, qk: SparsityValue | None, vo: SparsityValue | None
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if mlp is not None:
        out["mlp"] = _value_to_toml(mlp)
    if qk is not None and qk == vo:
        out["attn"] = _value_to_toml(qk)
    else:
        if qk is not None:
            out["attn_qk"] = _value_to_toml(qk)
        if vo is not None:
            out["attn_vo"] = _value_to_toml(vo)
    return out


def _parse_kind_values(table: Mapping[str, Any], where: str) -> dict[str, SparsityValue | None]:
    """mlp / attn_qk / attn_vo from a table where `attn` sets both attention keys."""
    if "attn" in table:
        both = [k for k in ("attn_qk", "attn_vo") if k in table]
        if both:
            raise _err(
                where,
                f"`attn` sets both attn_qk and attn_vo; it cannot be combined with "
                f"{', '.join(both)}. Use either `attn` or the two specific keys.",
            )
    attn = _parse_sparsity(table.get("attn"), where, "attn")
    return {
        "mlp": _parse_sparsity(table.get("mlp"), where, "mlp"),
        "attn_qk": _parse_sparsity(table.get("attn_qk"), where, "attn_qk") if attn is None else attn,
        "attn_vo": _parse_sparsity(table.get("attn_vo"), where, "attn_vo") if attn is None else attn,
    }


def _parse_estimator_spec(value: Any, where: str) -> EstimatorSpec:
    if isinstance(value, EstimatorSpec):
        return value
    if not isinstance(value, Mapping):
        raise _err(where, f"an estimator must be a table like {{kind = \"svd\", rank = 8}}, got {value!r}.")
    kind = value.get("kind", "svd")
    if kind not in ESTIMATOR_KINDS:
        close = difflib.get_close_matches(str(kind), ESTIMATOR_KINDS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise _err(
            where,
            f"unknown estimator kind {kind!r}.{hint} Valid kinds: {', '.join(ESTIMATOR_KINDS)}.",
        )
    _check_keys(value, _ESTIMATOR_PARAMS[kind], where)
    try:
        return EstimatorSpec(**dict(value))
    except PolicyError as exc:
        raise _err(where, str(exc)) from None


def _parse_estimators(value: Any, where: str) -> tuple[tuple[str, EstimatorSpec], ...]:
    """One spec for every kind, or a per-kind table (`attn` covers both attention kinds)."""
    if isinstance(value, tuple) and all(
        isinstance(p, tuple) and len(p) == 2 and isinstance(p[1], EstimatorSpec) for p in value
    ):
        value = dict(value)
    if value is None:
        return tuple((k, DEFAULT_ESTIMATORS[k]) for k in POLICY_KINDS)
    if isinstance(value, EstimatorSpec):
        return tuple((k, value) for k in POLICY_KINDS)
    if not isinstance(value, Mapping):
        raise _err(where, f"estimator must be a table or an EstimatorSpec, got {value!r}.")
    per_kind = [k for k in value if k in _ESTIMATOR_KIND_KEYS]
    if not per_kind:
        spec = _parse_estimator_spec(value, where)
        return tuple((k, spec) for k in POLICY_KINDS)
    if len(per_kind) != len(value):
        stray = [k for k in value if k not in _ESTIMATOR_KIND_KEYS]
        raise _err(
            where,
            f"mixes per-kind estimator tables ({', '.join(per_kind)}) with estimator "
            f"parameters ({', '.join(stray)}); use either one table for every kind "
            "({kind = \"svd\", rank = 8}) or per-kind tables keyed by "
            f"{', '.join(_ESTIMATOR_KIND_KEYS)}.",
        )
    if "attn" in value and ("attn_qk" in value or "attn_vo" in value):
        raise _err(where, "estimator.attn cannot be combined with estimator.attn_qk/attn_vo.")
    specs = dict(DEFAULT_ESTIMATORS)
    for key, sub in value.items():
        spec = _parse_estimator_spec(sub, f"{where}.{key}")
        for kind in (("attn_qk", "attn_vo") if key == "attn" else (key,)):
            specs[kind] = spec
    return tuple((k, specs[k]) for k in POLICY_KINDS)


def _check_dense_tokens(value: Any, where: str) -> float | int:
    """The output_dense token budget: a float in (0, 1] (fraction of the micro-batch's tokens) or
    an int >= 1 (a fixed count, capped at the micro-batch's tokens)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _err(where, f"dense_tokens must be a fraction in (0, 1] or a token count >= 1, got {value!r}.")
    if isinstance(value, float) and not 0.0 < value <= 1.0:
        raise _err(where, f"dense_tokens = {value!r} is outside (0, 1]: as a float it is the fraction of "
                          "each micro-batch's tokens computed dense; write an integer for a fixed count.")
    if isinstance(value, int) and value < 1:
        raise _err(where, f"dense_tokens = {value!r}: a fixed dense-token count must be >= 1.")
    return value


def _check_int(value: Any, where: str, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _err(where, f"{key} must be an integer >= {minimum}, got {value!r}.")
    return value


def _kind_key(kind: str) -> str:
    try:
        return GROUP_KINDS[kind]
    except (KeyError, TypeError):
        hint = (
            " `attn` is a policy shorthand, not a group kind: ask for attn_qk or attn_vo."
            if kind == "attn"
            else ""
        )
        raise PolicyError(
            f"unknown group kind {kind!r}; valid kinds: {', '.join(GROUP_KINDS)}.{hint}"
        ) from None


def _resolve_value(
    value: SparsityValue | None, index: int | None, num_layers: int | None, where: str
) -> float | None:
    if value is None:
        return None
    if isinstance(value, Ramp):
        if index is None:
            return None  # a ramp needs a depth; modules outside the layer stack stay dense
        if num_layers is None:
            raise PolicyError(
                f"{where}: a depth ramp needs the number of layers; call "
                "policy.bind(num_layers=N) (or bind(names=[...])), pass "
                "resolve(..., num_layers=N), or set num_layers in [defaults]."
            )
        if index >= num_layers:
            raise PolicyError(
                f"{where}: layer {index} is beyond num_layers = {num_layers}; bind the "
                "policy to the model's real depth."
            )
        value = value.at(index, num_layers)
        return None if value == 0.0 else float(value)  # a ramp's zero end means dense
    return float(value)  # an explicit 0 runs the sparse machinery keeping every channel


def _check_layer(layer: Any, num_layers: int | None, source: str) -> None:
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise PolicyError(
            f"{source}: layer = {layer!r} must be an int >= 0, the index (from 0) of the decoder "
            "layer a per-layer compile holds."
        )
    if num_layers is not None and layer >= num_layers:
        raise PolicyError(
            f"{source}: layer {layer} is beyond num_layers = {num_layers} (layers count from 0); "
            "give the model's real depth."
        )


# Measured defaults (benchmarks/results/fidelity.md, MiniLM-L6 real weights): exact activations of
# sampled tokens keep far more of the oracle's activation energy than the rank-8 SVD (0.91 with 64
# tokens, 0.97 with 128, against 0.45 at MLP sparsity 0.9). The sample is 3% of the micro-batch's
# tokens, at least 64: for a gated MLP (2 of its 3 GEMMs estimated) 3% is 2% of the group's dense
# forward GEMM FLOPs (122 tokens at 4096), so the estimator's share of a step does not grow with
# the batch. The floor decides below 2134 tokens: at ~900-token batches 64 tokens keep 0.96 /
# 0.94 / 0.93 of the oracle's energy where 32 kept 0.92 / 0.89 / 0.86 (fidelity.md), and on CPU a
# 64-row GEMM is no slower than a 61-row one (the weight read dominates). V/O uses the
# same rule (its estimate is cheaper still). Q/K: the paper's rank-8 SVD, scored through a Gram
# matrix (no per-token estimate).
DEFAULT_ESTIMATORS: dict[str, EstimatorSpec] = {
    "mlp": EstimatorSpec("token_sample", samples=64, fraction=0.03),
    "attn_vo": EstimatorSpec("token_sample", samples=64, fraction=0.03),
    "attn_qk": EstimatorSpec("svd", rank=DEFAULT_SVD_RANK),
}


# --------------------------------------------------------------------------------------------
# Policy
# --------------------------------------------------------------------------------------------

PolicyLike = Union["Policy", str, os.PathLike, Mapping[str, Any], None]


@dataclass(frozen=True)
class Policy:
    """Where and how much contextual sparsity to apply, plus warm-up and token settings.

    Why: one immutable, hashable object the graph passes query per group
    (`resolve(name, kind)`), loadable from TOML/JSON/presets and dumpable back to TOML. Sparsity
    is the fraction of channels DROPPED; `None` means dense. `mlp`, `attn_qk`, `attn_vo` are the
    defaults for modules no rule decides; ordered `rules` override them (first rule that matches
    the name AND sets the kind wins). `estimator` is an `EstimatorSpec` for every kind or a
    mapping kind -> spec (normalised to a tuple of pairs).
    """

    mlp: SparsityValue | None = None
    attn_qk: SparsityValue | None = None
    attn_vo: SparsityValue | None = None
    rules: tuple[Rule, ...] = ()
    estimator: Any = None  # None: the measured per-kind defaults (DEFAULT_ESTIMATORS)
    warmup_steps: int = 0
    warmup_fraction: float | None = None
    total_steps: int | None = None
    tokens: str = "all_sparse"
    dense_tokens: float | int = DEFAULT_DENSE_TOKENS
    num_layers: int | None = None
    description: str = ""
    source: str = field(default="<code>", compare=False)

    def __post_init__(self) -> None:
        where = self.source
        for kind in POLICY_KINDS:
            object.__setattr__(self, kind, _parse_sparsity(getattr(self, kind), where, kind))
        rules = tuple(self.rules)
        for i, rule in enumerate(rules):
            if not isinstance(rule, Rule):
                raise _err(where, f"rules[{i}] must be a Rule, got {type(rule).__name__}.")
        seen: dict[Any, int] = {}
        for i, rule in enumerate(rules):
            if rule.key in seen:
                raise _err(
                    where,
                    f"rules[{i}] selects the same modules as rules[{seen[rule.key]}] "
                    f"(match = {list(rule.match)!r}, layers = {_layers_text(rule.layers)!r}); "
                    "the later one could only apply to kinds the earlier one leaves unset. "
                    "Merge them into one rule.",
                )
            seen[rule.key] = i
        object.__setattr__(self, "rules", rules)
        object.__setattr__(self, "estimator", _parse_estimators(self.estimator, f"{where}: estimator"))
        _check_int(self.warmup_steps, where, "warmup_steps", 0)
        if self.warmup_fraction is not None:
            frac = _check_fraction(self.warmup_fraction, where, "warmup_fraction")
            object.__setattr__(self, "warmup_fraction", frac)
            if self.warmup_steps:
                raise _err(
                    where,
                    f"both warmup_steps = {self.warmup_steps} and warmup_fraction = {frac} are "
                    "set; give one of them.",
                )
        if self.total_steps is not None:
            _check_int(self.total_steps, where, "total_steps", 1)
        if self.num_layers is not None:
            _check_int(self.num_layers, where, "num_layers", 1)
        if self.tokens not in TOKEN_MODES:
            raise _err(
                where,
                f"tokens = {self.tokens!r} is not a token mode; valid: {', '.join(TOKEN_MODES)} "
                "(output_dense: tokens whose logits enter the loss stay dense).",
            )
        object.__setattr__(self, "dense_tokens", _check_dense_tokens(self.dense_tokens, where))
        if not isinstance(self.description, str):
            raise _err(where, f"description must be a string, got {self.description!r}.")

    # ---- queries -----------------------------------------------------------------------------

    def resolve(
        self, name: str, kind: str, *, num_layers: int | None = None, layer: int | None = None
    ) -> float | None:
        """Sparsity for the group whose first unit is `name`: None (dense) or a float in [0, 1).

        Why: the single question the plan pass asks. `kind` is a group kind (`gated_mlp`,
        `mlp`, `attn_qk`, `attn_vo`). Rules are tried in order; the first that matches the name
        (or one of its dotted parents, in any PEFT / compile spelling) AND sets this kind wins;
        otherwise the policy default applies. An explicit 0 stays 0.0 (sparse ops keeping every
        channel: the machinery runs, nothing is dropped); a depth ramp's 0 end means dense.
        `layer` is for per-layer compiles: a name without a layer index is read as a module of
        that layer (see `layer_spellings`).
        """
        key = _kind_key(kind)
        n = num_layers if num_layers is not None else self.num_layers
        spellings = self.layer_spellings(name, layer, num_layers=n)
        index = layer_index(spellings[0])
        cands = [_candidates(s) for s in spellings]
        for i, rule in enumerate(self.rules):
            if rule.sets(key) and any(rule._matches(s, c, index, n) for s, c in zip(spellings, cands)):
                return _resolve_value(rule.value(key), index, n, f"{self.source}: rules[{i}].{key}")
        return _resolve_value(getattr(self, key), index, n, f"{self.source}: defaults.{key}")

    # ---- per-layer compiles ------------------------------------------------------------------

    def layer_spellings(
        self, name: str, layer: int | None, *, num_layers: int | None = None
    ) -> list[str]:
        """The names `name` is matched under: itself, or for a per-layer compile its full paths.

        Why: a graph of one decoder layer names its units `mlp.gate_proj`; rules are written
        against `model.layers.3.mlp.gate_proj`. With `layer` given, a name without a layer index
        becomes `<stack>.<layer>.<name>` for each layer stack the rules' patterns name
        (`model.layers` in `model.layers.*.mlp`; `layers` when none does), and a rule matches
        when it matches any of them. A name with its own layer index is kept as it is.
        """
        normalized = normalize_module_name(name)
        if layer is None or layer_index(normalized) is not None:
            return [normalized]
        _check_layer(layer, num_layers if num_layers is not None else self.num_layers, self.source)
        stacks = self.layer_stacks or (DEFAULT_LAYER_STACK,)
        return [f"{stack}.{layer}.{normalized}" for stack in stacks]

    @property
    def layer_stacks(self) -> tuple[str, ...]:
        """The layer-stack paths the rules' match patterns name (`model.layers`), first seen first."""
        stacks = (pattern_layer_stack(p) for rule in self.rules for p in rule.match)
        return tuple(dict.fromkeys(s for s in stacks if s is not None))

    @property
    def needs_depth(self) -> bool:
        """Whether a value depends on the model's depth: a ramp, or a layer counted from the end."""
        return any(isinstance(v, Ramp) for v in self._values()) or any(
            start < 0 for rule in self.rules for start, _ in rule.layers
        )

    @property
    def layer_indexed(self) -> bool:
        """Whether a rule or value depends on a module's layer index (`layers`, ramps, patterns).

        Why: names without a layer index (a per-layer compile) never satisfy such a rule, so the
        plan pass warns instead of leaving those groups silently dense.
        """
        return (
            any(isinstance(v, Ramp) for v in self._values())
            or any(rule.layers for rule in self.rules)
            or bool(self.layer_stacks)
        )

    def _values(self) -> list[SparsityValue | None]:
        values = [getattr(self, k) for k in POLICY_KINDS]
        return values + [getattr(rule, k) for rule in self.rules for k in POLICY_KINDS]

    def estimator_for(self, kind: str) -> EstimatorSpec:
        """The estimator to use for a group kind (`gated_mlp` maps to `mlp`)."""
        return dict(self.estimator)[_kind_key(kind)]

    def warmup_steps_for(self, total_steps: int | None = None) -> int:
        """Number of dense warm-up optimizer steps.

        Why: the paper runs the first ~5% of steps dense. A fraction needs the run's total
        (argument, else `total_steps` from the policy) and gives ceil(fraction * total),
        computed on the decimal value as written (0.05 * 1000 = 50, not 51).
        """
        if self.warmup_fraction is None:
            return self.warmup_steps
        total = total_steps if total_steps is not None else self.total_steps
        if total is None:
            raise PolicyError(
                f"{self.source}: warmup_fraction = {self.warmup_fraction} needs the total number "
                "of optimizer steps; pass warmup_steps_for(total_steps=N), set total_steps in "
                "[defaults], or use warmup_steps = N instead."
            )
        _check_int(total, self.source, "total_steps", 1)
        return math.ceil(Fraction(repr(self.warmup_fraction)) * total)

    def check_names(self, names: Iterable[str]) -> list[str]:
        """Warnings for rules (or their patterns) that select none of the given module names.

        Why: a typo in a pattern silently leaves layers dense; each warning names the rule, the
        pattern, and the 3 nearest real names (difflib) so the fix is obvious.
        """
        normalized = sorted({normalize_module_name(n) for n in names})
        indexed = [(n, _candidates(n), layer_index(n)) for n in normalized]
        pool = sorted({p for n in normalized for p in _prefixes(n)})
        n_layers = self.num_layers
        if n_layers is None:
            indices = [i for _, _, i in indexed if i is not None]
            n_layers = max(indices) + 1 if indices else None
        warnings: list[str] = []
        for r, rule in enumerate(self.rules):
            where = f"{self.source}: rules[{r}]"
            pattern_ok = True
            for pattern in rule.match:
                if not any(_pattern_matches(pattern, n, c) for n, c, _ in indexed):
                    pattern_ok = False
                    needle = pattern[3:] if pattern.startswith("re:") else normalize_module_name(pattern)
                    near = difflib.get_close_matches(needle, pool, n=3, cutoff=0.0)
                    warnings.append(
                        f"{where}: match pattern {pattern!r} matches no module; nearest names: "
                        f"{', '.join(near) if near else '(no names given)'}."
                    )
            layers_checkable = n_layers is not None or all(a >= 0 for a, _ in rule.layers)
            if rule.layers and layers_checkable:
                if not any(i is not None and rule._layer_selected(i, n_layers) for _, _, i in indexed):
                    pattern_ok = False
                    found = sorted({i for _, _, i in indexed if i is not None})
                    span = f"{found[0]}..{found[-1]}" if found else "none"
                    warnings.append(
                        f"{where}: layers {_layers_text(rule.layers)!r} select no module "
                        f"(layer indices present: {span})."
                    )
            if pattern_ok and layers_checkable and rule.match and rule.layers and not any(
                rule._matches(n, c, i, n_layers) for n, c, i in indexed
            ):
                warnings.append(
                    f"{where}: its match patterns and layers selector each select modules, but "
                    "no module satisfies both."
                )
        return warnings

    def describe(
        self,
        names: Sequence[str],
        kinds: Sequence[str] = POLICY_KINDS,
        *,
        num_layers: int | None = None,
    ) -> str:
        """A plain-text table of the resolved sparsity per name and kind ("dense" for None)."""
        from tabulate import tabulate

        rows = []
        for name in names:
            row = [normalize_module_name(name)]
            for kind in kinds:
                value = self.resolve(name, kind, num_layers=num_layers)
                row.append("dense" if value is None else f"{value:.4g}")
            rows.append(row)
        return tabulate(rows, headers=["module", *kinds])

    # ---- derived policies --------------------------------------------------------------------

    def with_sparsity(self, sparsity: float) -> Policy:
        """Every group kind of every layer sparse at `sparsity`; estimator, warm-up, tokens kept.

        Why: sweeps and benchmarks want one knob; the rules are dropped because they exist to
        make some layers differ.
        """
        s = _check_fraction(sparsity, f"{self.source}: with_sparsity", "sparsity")
        return dataclasses.replace(
            self, mlp=s, attn_qk=s, attn_vo=s, rules=(), source=f"{self.source} (with_sparsity={s})"
        )

    def bind(self, num_layers: int | None = None, *, names: Iterable[str] | None = None) -> Policy:
        """This policy with the model depth fixed, so ramps and negative layer indices resolve.

        Why: presets are depth-agnostic; the graph passes know the module names. With `names`,
        the depth is the largest layer index found plus one.
        """
        if num_layers is None:
            if names is None:
                raise PolicyError("Policy.bind: give num_layers=N or names=[...module names].")
            indices = [i for i in (layer_index(n) for n in names) if i is not None]
            if not indices:
                raise PolicyError(
                    "Policy.bind: none of the given names carries a layer index (a numeric "
                    "component like model.layers.3); pass num_layers=N."
                )
            num_layers = max(indices) + 1
        _check_int(num_layers, f"{self.source}: bind", "num_layers", 1)
        return dataclasses.replace(self, num_layers=num_layers)

    def for_names(self, names: Iterable[str]) -> Policy:
        """Bind the depth from the model's module names, unless already bound or not inferable.

        Why: the plan pass sees every unit name but not the model config; calling this once
        before the `resolve` loop makes depth ramps and negative layer indices work with the
        depth-agnostic presets. A policy with `num_layers` set is returned unchanged, as is one
        when no name carries a layer index. Under DDP graph splits each piece sees only some
        layers: set `num_layers` explicitly there.
        """
        if self.num_layers is not None:
            return self
        names = list(names)
        if not any(layer_index(n) is not None for n in names):
            return self
        return self.bind(names=names)

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "<dict>") -> Policy:
        """Build from the TOML-shaped mapping (`description`, `[defaults]`, `[[rules]]`).

        Why: the one parser behind TOML, JSON and dict options; every error names `source` and
        the key path.
        """
        if not isinstance(data, Mapping):
            raise _err(source, f"a policy must be a table/dict, got {type(data).__name__}.")

        def top_hint(key: str) -> str:
            if key in _DEFAULTS_KEYS:
                return f" Put {key!r} under [defaults]."
            if key in ("match", "dense", "layers"):
                return f" {key!r} belongs in a [[rules]] entry."
            return ""

        _check_keys(data, _TOP_KEYS, source, top_hint)
        defaults = data.get("defaults", {})
        if not isinstance(defaults, Mapping):
            raise _err(source, "[defaults] must be a table.")
        where = f"{source}: defaults"
        _check_keys(defaults, _DEFAULTS_KEYS, where)
        values = _parse_kind_values(defaults, where)
        if defaults.get("warmup_fraction") is not None:
            _check_fraction(defaults["warmup_fraction"], where, "warmup_fraction")
        for key, minimum in (("total_steps", 1), ("num_layers", 1)):
            if defaults.get(key) is not None:
                _check_int(defaults[key], where, key, minimum)
        if defaults.get("tokens", "all_sparse") not in TOKEN_MODES:
            raise _err(
                where,
                f"tokens = {defaults['tokens']!r} is not a token mode; valid: "
                f"{', '.join(TOKEN_MODES)}.",
            )
        raw_rules = data.get("rules", [])
        if not isinstance(raw_rules, Sequence) or isinstance(raw_rules, str):
            raise _err(source, "rules must be an array of tables ([[rules]]).")
        rules = [cls._parse_rule(raw, f"{source}: rules[{i}]") for i, raw in enumerate(raw_rules)]
        return cls(
            **values,
            rules=tuple(rules),
            estimator=_parse_estimators(defaults.get("estimator"), f"{where}.estimator"),
            warmup_steps=_check_int(defaults.get("warmup_steps", 0), where, "warmup_steps", 0),
            warmup_fraction=defaults.get("warmup_fraction"),
            total_steps=defaults.get("total_steps"),
            tokens=defaults.get("tokens", "all_sparse"),
            dense_tokens=_check_dense_tokens(defaults.get("dense_tokens", DEFAULT_DENSE_TOKENS), where),
            num_layers=defaults.get("num_layers"),
            description=data.get("description", ""),
            source=source,
        )

    @staticmethod
    def _parse_rule(raw: Any, where: str) -> Rule:
        if not isinstance(raw, Mapping):
            raise _err(where, f"a rule must be a table, got {raw!r}.")
        _check_keys(raw, _RULE_KEYS, where)
        dense = raw.get("dense", False)
        if not isinstance(dense, bool):
            raise _err(where, f"dense must be true or false, got {dense!r}.")
        values = _parse_kind_values(raw, where)
        match = _parse_match(raw.get("match"), where)
        try:
            return Rule(match=match, layers=_parse_layers(raw.get("layers"), where), dense=dense, **values)
        except PolicyError as exc:
            message = str(exc).removeprefix(f"Rule(match={match!r}): ")
            raise _err(where, message) from None

    @classmethod
    def from_toml_text(cls, text: str, *, source: str = "<toml>") -> Policy:
        """Parse TOML text; malformed TOML reports the line and column."""
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise _decode_error(source, "TOML", exc) from None
        return cls.from_dict(data, source=source)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Policy:
        """Load a policy file: `.toml` (primary) or `.json`, chosen by suffix."""
        p = Path(path)
        suffix = p.suffix.lower()
        if suffix not in (".toml", ".json"):
            raise PolicyError(
                f"{p}: unsupported policy file type {suffix or '(none)'!r}; use a .toml or .json "
                "file (or Policy.from_reference_yaml for the reference release's YAML)."
            )
        text = _read_text(p)
        if suffix == ".toml":
            return cls.from_toml_text(text, source=str(p))
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PolicyError(
                f"{p}:{exc.lineno}:{exc.colno}: malformed JSON at line {exc.lineno}, column "
                f"{exc.colno}: {exc.msg}."
            ) from None
        return cls.from_dict(data, source=str(p))

    @classmethod
    def preset_names(cls) -> list[str]:
        """Names of the bundled presets (files in sparselora_fx/presets/)."""
        return _preset_names()

    @classmethod
    def preset(cls, name: str) -> Policy:
        """A bundled preset by name; unknown names list the available ones."""
        names = _preset_names()
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise PolicyError(
                f"unknown policy preset {name!r}.{hint} Available presets: {', '.join(names)}."
            )
        return _load_preset(name)

    @classmethod
    def coerce(cls, value: PolicyLike) -> Policy:
        """Turn what a user passed as `policy=` into a Policy.

        Accepts a Policy (returned as is), a preset name, a path (str or PathLike) to a
        .toml/.json file, a dict in the file's shape, or None, which means the `default` preset
        (the user chose the sparselora backend, so sparsity is on; use "dense" for none).
        """
        if value is None:
            return cls.preset("default")
        if isinstance(value, Policy):
            return value
        if isinstance(value, Mapping):
            return cls.from_dict(value, source="<policy dict>")
        if isinstance(value, os.PathLike):
            return cls.load(value)
        if isinstance(value, str):
            if value in _preset_names():
                return cls.preset(value)
            p = Path(value)
            if p.suffix.lower() in (".toml", ".json") or p.exists() or os.sep in value:
                return cls.load(p)
            return cls.preset(value)  # raises, listing the presets
        raise PolicyError(
            f"policy must be a Policy, a preset name, a path to a .toml/.json file, a dict or "
            f"None; got {type(value).__name__}."
        )

    # ---- output ------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The TOML-shaped mapping; `Policy.from_dict(p.to_dict()) == p`."""
        defaults: dict[str, Any] = _kinds_to_dict(self.mlp, self.attn_qk, self.attn_vo)
        defaults["tokens"] = self.tokens
        if self.dense_tokens != DEFAULT_DENSE_TOKENS:
            defaults["dense_tokens"] = self.dense_tokens
        if self.warmup_fraction is not None:
            defaults["warmup_fraction"] = self.warmup_fraction
        else:
            defaults["warmup_steps"] = self.warmup_steps
        if self.total_steps is not None:
            defaults["total_steps"] = self.total_steps
        if self.num_layers is not None:
            defaults["num_layers"] = self.num_layers
        specs = dict(self.estimator)
        if len(set(specs.values())) == 1:
            defaults["estimator"] = specs["mlp"].to_dict()
        else:
            defaults["estimator"] = {k: specs[k].to_dict() for k in POLICY_KINDS}
        out: dict[str, Any] = {}
        if self.description:
            out["description"] = self.description
        out["defaults"] = defaults
        if self.rules:
            out["rules"] = [rule.to_dict() for rule in self.rules]
        return out

    def dump(self) -> str:
        """TOML text; `Policy.from_toml_text(p.dump()) == p`."""
        return _emit_toml(self.to_dict())

    # ---- importers ---------------------------------------------------------------------------

    @classmethod
    def from_reference_yaml(cls, path: str | os.PathLike, *, prefix: str = "model.") -> Policy:
        """Import a sparsity YAML of the reference release (configs/sparsity/*.yaml).

        Why: users arrive with those files. Reads `sparsity` (`layers.N.mlp` /
        `layers.N.self_attn` -> mlp / attn; 0 = dense), `start_step` (a fraction < 1 ->
        warmup_fraction, an int >= 1 -> warmup_steps), `skip_output_tokens` (true ->
        output_dense), `mode` ("svd_K" -> SVD rank K, "dense" -> no sparsity). The informative
        `ffn_sparsity` / `qkvo_sparsity` strings are ignored. Names get `prefix` prepended
        (`layers.3.mlp` -> `model.layers.3.mlp`).
        """
        try:
            import yaml
        except ImportError:
            raise PolicyError(
                f"{path}: reading the reference release's YAML needs PyYAML; "
                "run `pip install pyyaml`."
            ) from None
        p = Path(path)
        text = _read_text(p)
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            loc = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
            raise PolicyError(f"{p}{loc}: malformed YAML: {exc}") from None
        source = str(p)
        if not isinstance(data, Mapping):
            raise _err(source, "expected a mapping at the top of the reference YAML.")
        valid = ("start_step", "mode", "skip_output_tokens", "ffn_sparsity", "qkvo_sparsity", "sparsity")
        _check_keys(data, valid, source)
        mode = data.get("mode", "svd_8")
        estimator = _reference_mode(mode, source)
        sparsity = data.get("sparsity", {}) or {}
        if not isinstance(sparsity, Mapping):
            raise _err(source, "`sparsity` must map module names to fractions.")
        rules = () if estimator is None else _reference_rules(sparsity, prefix, f"{source}: sparsity")
        skip = data.get("skip_output_tokens", False)
        if not isinstance(skip, bool):
            raise _err(source, f"skip_output_tokens must be true or false, got {skip!r}.")
        warm = _reference_start_step(data.get("start_step", 0), source)
        return cls(
            rules=rules,
            estimator=estimator,
            tokens="output_dense" if skip else "all_sparse",
            description=f"imported from {p.name} (reference release YAML)",
            source=source,
            **warm,
        )

    @classmethod
    def from_reference_json(
        cls, path: str | os.PathLike, mode: str | None = None, *, tokens: str = "output_dense"
    ) -> Policy:
        """Import a reference-release JSON preset (`{"modes": {"o1": {"layer_sparsity": ...}}}`).

        Why: the release's newer package ships presets as JSON next to its predictor factors.
        `mode` picks one entry of `modes` (required when there are several); `predictor_rank`
        sets the SVD rank; `start_step` (top level or in the mode), when present, sets the
        warm-up. The JSON does not say how output tokens are treated; `tokens` (default
        output_dense, the paper's recommendation) does.
        """
        p = Path(path)
        source = str(p)
        text = _read_text(p)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PolicyError(
                f"{p}:{exc.lineno}:{exc.colno}: malformed JSON at line {exc.lineno}, column "
                f"{exc.colno}: {exc.msg}."
            ) from None
        if not isinstance(data, Mapping):
            raise _err(source, "expected a JSON object at the top.")
        _check_keys(data, ("base_model", "predictor_rank", "modes", "start_step"), source)
        modes = data.get("modes")
        if not isinstance(modes, Mapping) or not modes:
            raise _err(source, "expected a non-empty `modes` object mapping mode names to settings.")
        if mode is None:
            if len(modes) != 1:
                raise _err(
                    source,
                    f"the file has several modes ({', '.join(modes)}); pass mode=... to pick one.",
                )
            mode = next(iter(modes))
        if mode not in modes:
            raise _err(source, f"mode {mode!r} not found; available modes: {', '.join(modes)}.")
        entry = modes[mode]
        where = f"{source}: modes.{mode}"
        if not isinstance(entry, Mapping):
            raise _err(where, "a mode must be an object with `layer_sparsity`.")
        _check_keys(entry, ("layer_sparsity", "start_step"), where)
        rank = data.get("predictor_rank", DEFAULT_SVD_RANK)
        _check_int(rank, source, "predictor_rank", 1)
        layer_sparsity = entry.get("layer_sparsity", {})
        if not isinstance(layer_sparsity, Mapping):
            raise _err(where, "`layer_sparsity` must map module names to fractions.")
        warm = _reference_start_step(entry.get("start_step", data.get("start_step", 0)), source)
        return cls(
            rules=_reference_rules(layer_sparsity, "", f"{where}.layer_sparsity"),
            estimator=EstimatorSpec("svd", rank=rank),
            tokens=tokens,
            description=f"imported from {p.name} mode {mode} (reference release JSON)",
            source=source,
            **warm,
        )


# --------------------------------------------------------------------------------------------
# File helpers and presets
# --------------------------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PolicyError(
            f"{path}: policy file not found; give an existing file or a preset name "
            f"({', '.join(_preset_names())})."
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"{path}: cannot read the policy file: {exc}.") from None


_AT_LINE = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*$")


def _decode_error(source: str, fmt: str, exc: Exception) -> PolicyError:
    message = str(exc)
    line = getattr(exc, "lineno", None)
    col = getattr(exc, "colno", None)
    m = _AT_LINE.search(message)
    if m:
        message = message[: m.start()]
        line, col = int(m.group(1)), int(m.group(2))
    if line is not None:
        return PolicyError(
            f"{source}:{line}:{col}: malformed {fmt} at line {line}, column {col}: {message}."
        )
    return PolicyError(f"{source}: malformed {fmt}: {message}.")


def _presets_dir() -> Any:
    return importlib.resources.files("sparselora_fx").joinpath("presets")


@functools.lru_cache(maxsize=1)
def _preset_names() -> list[str]:
    names = [e.name[: -len(".toml")] for e in _presets_dir().iterdir() if e.name.endswith(".toml")]
    return sorted(names)


@functools.lru_cache(maxsize=None)
def _load_preset(name: str) -> Policy:
    text = _presets_dir().joinpath(f"{name}.toml").read_text(encoding="utf-8")
    return Policy.from_toml_text(text, source=f"preset {name!r}")


# --------------------------------------------------------------------------------------------
# Reference-release importers
# --------------------------------------------------------------------------------------------

_REF_KEY = re.compile(r"^(?P<stem>.*?)(?P<index>\d+)\.(?P<module>[A-Za-z_][\w]*)$")
_REF_MODULES = {"mlp": ("mlp",), "self_attn": ("attn_qk", "attn_vo")}


def _reference_mode(mode: Any, source: str) -> EstimatorSpec | None:
    if mode == "dense":
        return None
    m = re.fullmatch(r"svd_(\d+)", str(mode))
    if not m or int(m.group(1)) < 1:
        raise _err(
            source,
            f"mode {mode!r} is not understood; the importer reads \"svd_K\" (SVD estimator of "
            "rank K) and \"dense\".",
        )
    return EstimatorSpec("svd", rank=int(m.group(1)))


def _reference_start_step(value: Any, source: str) -> dict[str, Any]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise _err(source, f"start_step must be a fraction in [0, 1) or a step count, got {value!r}.")
    if isinstance(value, int) or (isinstance(value, float) and value >= 1 and value.is_integer()):
        return {"warmup_steps": int(value)}
    if value >= 1:
        raise _err(source, f"start_step = {value!r}: a fraction must be < 1, a step count an integer.")
    return {"warmup_fraction": float(value)} if value > 0 else {}


def _reference_rules(table: Mapping[str, Any], prefix: str, where: str) -> tuple[Rule, ...]:
    """`<stem>N.<mlp|self_attn>: s` entries -> one rule per (stem, module, value) with ranges."""
    groups: dict[tuple[str, str, float], list[int]] = {}
    for key, value in table.items():
        m = _REF_KEY.match(str(key))
        if not m or m.group("module") not in _REF_MODULES:
            raise _err(
                where,
                f"cannot read module key {key!r}; expected `layers.N.mlp` or "
                "`layers.N.self_attn` (optionally with a prefix such as `model.`).",
            )
        s = _check_fraction(value, where, str(key))
        if s == 0.0:
            continue
        stem = prefix + m.group("stem") if not m.group("stem").startswith(prefix) else m.group("stem")
        groups.setdefault((stem, m.group("module"), s), []).append(int(m.group("index")))
    rules = []
    for (stem, module, s), indices in groups.items():
        kinds = {kind: s for kind in _REF_MODULES[module]}
        rules.append(Rule(match=(f"{stem}*.{module}",), layers=_to_ranges(indices), **kinds))
    return tuple(rules)


def _to_ranges(indices: Iterable[int]) -> tuple[tuple[int, int], ...]:
    out: list[list[int]] = []
    for i in sorted(set(indices)):
        if out and i == out[-1][1] + 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return tuple((a, b) for a, b in out)


# --------------------------------------------------------------------------------------------
# A tiny TOML emitter (only what to_dict produces: scalars, lists, inline tables, [[rules]])
# --------------------------------------------------------------------------------------------

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else _toml_string(key)


def _toml_string(s: str) -> str:
    if "'" not in s and "\\" in s and not any(ord(c) < 0x20 or ord(c) == 0x7F for c in s):
        return f"'{s}'"  # literal string: regexes stay readable
    out = []
    for ch in s:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise PolicyError(f"cannot write the non-finite number {value!r} to TOML.")
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, Mapping):
        inner = ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + inner + " }" if inner else "{}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise PolicyError(f"cannot write a {type(value).__name__} to TOML.")


def _emit_toml(doc: Mapping[str, Any]) -> str:
    lines: list[str] = []
    for key, value in doc.items():
        if not isinstance(value, Mapping) and not (
            isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value)
        ):
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for key, value in doc.items():
        if isinstance(value, Mapping):
            lines += ["", f"[{_toml_key(key)}]"]
            lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()]
    for key, value in doc.items():
        if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            for table in value:
                lines += ["", f"[[{_toml_key(key)}]]"]
                lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines).lstrip("\n") + "\n"
