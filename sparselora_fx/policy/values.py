"""The values a policy is built from, and the checks every constructor runs on them.

What lives here: the constants (policy keys, token modes, defaults), the error helpers that name
where a value came from, the value types `Ramp` and `EstimatorSpec` with the measured
`DEFAULT_ESTIMATORS`, and the checks of single values (fractions, ramps, match patterns,
`layers` selectors, estimator tables) that `Rule` and `Policy` run in `__post_init__` and the
readers (policy/reading.py) run on file contents. Estimator kinds and their knobs come from the
package's estimator registry (sparselora_fx/estimator_registry.py), not from the runtime.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

from .. import estimator_registry
from ..errors import PolicyError
from .matching import _compile_pattern


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
DEFAULT_SVD_RANK = 8
DEFAULT_TOKEN_SAMPLES = 64
DEFAULT_TOKEN_SEED = 0
#: tokens = "output_dense": the dense-token budget per micro-batch (a fraction of its tokens).
DEFAULT_DENSE_TOKENS = 0.25

_ESTIMATOR_KIND_KEYS = ("mlp", "attn", "attn_qk", "attn_vo")


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
# Value types and estimator kinds
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


def _estimator_kinds() -> tuple[str, ...]:
    """The estimator kinds a policy may name: every kind in the estimator registry."""
    return estimator_registry.kinds()


def _estimator_params(kind: str) -> tuple[str, ...]:
    """The keys an estimator table of `kind` may hold: `kind` and the knobs registered for it."""
    entry = estimator_registry.lookup(kind)
    return ("kind", *(entry.params if entry is not None else ()))


def _check_estimator_kind(kind: Any, where: str) -> None:
    kinds = _estimator_kinds()
    if kind not in kinds:
        close = difflib.get_close_matches(str(kind), kinds, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise _err(
            where,
            f"unknown estimator kind {kind!r}.{hint} Valid kinds: {', '.join(kinds)}.",
        )


def describe_estimator(kind: str, rank: int | None = None, samples: int | None = None,
                       fraction: float | None = None) -> str:
    """Short text for tables: `svd:8`, `token_sample:120`, `token_sample:64+3%`, `random`."""
    if kind == "svd":
        return f"svd:{rank}"
    if kind == "token_sample":
        return f"token_sample:{samples}" + (f"+{100 * fraction:g}%" if fraction else "")
    return kind


@dataclass(frozen=True)
class EstimatorSpec:
    """Which estimator scores channels for a group kind, and its parameters.

    Why: the runtime needs one small, hashable description per group kind. Kinds: `svd`
    (rank-`rank` factors of the frozen weight, default rank 8), `token_sample` (scores from
    `samples` tokens drawn with `seed`, defaults 64 and 0; with `fraction`, max(samples,
    floor(fraction * tokens)) so the cost stays a fixed share of the micro-batch's GEMMs) and
    `random` (random channels each step: a baseline for accuracy studies, not for training),
    plus any kind added with `runtime.estimators.register_estimator` (its knobs: those of rank,
    samples, seed, fraction its class takes). Parameters that do not belong to the kind must
    stay None.
    """

    kind: str = "svd"
    rank: int | None = None
    samples: int | None = None
    seed: int | None = None
    fraction: float | None = None

    def __post_init__(self) -> None:
        where = f"EstimatorSpec(kind={self.kind!r})"
        _check_estimator_kind(self.kind, where)
        allowed = _estimator_params(self.kind)
        for param in estimator_registry.KNOBS:
            value = getattr(self, param)
            if value is None:
                continue
            if param not in allowed:
                raise _err(
                    where,
                    f"parameter {param!r} does not apply to estimator kind {self.kind!r}; "
                    f"its parameters are: {', '.join(allowed[1:]) or '(none)'}.",
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
        return {k: getattr(self, k) for k in _estimator_params(self.kind) if getattr(self, k) is not None}

    def describe(self) -> str:
        """Short text for tables: `svd:8`, `token_sample:64+3%`, `random`."""
        return describe_estimator(self.kind, self.rank, self.samples, self.fraction)

    def op_args(self) -> tuple[str, int, int, int, float]:
        """``(kind, rank, samples, seed, fraction)``: the estimator arguments every ``sparselora::select_*``
        op takes, a knob this kind leaves unset at its default (the op passes all five to every kind).

        Why here: custom-op schemas take plain scalars, not this dataclass; this is the one place
        that says which scalars, in what order, with what defaults.
        """
        return (self.kind, DEFAULT_SVD_RANK if self.rank is None else self.rank,
                DEFAULT_TOKEN_SAMPLES if self.samples is None else self.samples,
                DEFAULT_TOKEN_SEED if self.seed is None else self.seed,
                0.0 if self.fraction is None else float(self.fraction))


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
# Checks of single values (constructors and readers run them)
# --------------------------------------------------------------------------------------------


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
        except PolicyError as exc:  # a regex that could backtrack for ever (matching.regex_hazard)
            raise _err(where, str(exc)) from None
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


def _parse_estimator_spec(value: Any, where: str) -> EstimatorSpec:
    if isinstance(value, EstimatorSpec):
        return value
    if not isinstance(value, Mapping):
        raise _err(where, f"an estimator must be a table like {{kind = \"svd\", rank = 8}}, got {value!r}.")
    kind = value.get("kind", "svd")
    _check_estimator_kind(kind, where)
    _check_keys(value, _estimator_params(kind), where)
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
