"""The sparsity policy: which layers go sparse, how much, and with which estimator.

A policy is data, not code: a TOML (or JSON) file, a bundled preset, or a `Policy` built in
Python. The graph passes ask it one question per dataflow group -- `resolve(name, kind)` -- and
get back `None` (dense) or the fraction of channels to DROP. Everything a user may tune about
*where* sparsity applies lives here; see docs/policy.md for the guide.

This module holds `Policy` and the resolving logic. The package splits the other jobs:
policy/matching.py (module names and patterns), policy/values.py (value types, constants,
checks), policy/rules.py (`Rule`), policy/writing.py (to dict / TOML), policy/presets.py (the
bundled presets), policy/reading.py (from dict / TOML / JSON), policy/importers.py (the
reference release's files). Policy's classmethods delegate to those, handing over the class to
build, so none of them imports this module.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Union

from ..errors import PolicyError
from . import importers, presets, reading
from .matching import (
    DEFAULT_LAYER_STACK,
    _candidates,
    _pattern_matches,
    _prefixes,
    layer_index,
    normalize_module_name,
    pattern_layer_stack,
)
from .rules import Rule
from .values import (
    DEFAULT_DENSE_TOKENS,
    GROUP_KINDS,
    POLICY_KINDS,
    TOKEN_MODES,
    EstimatorSpec,
    Ramp,
    SparsityValue,
    _check_dense_tokens,
    _check_fraction,
    _check_int,
    _err,
    _layers_text,
    _parse_estimators,
    _parse_sparsity,
)
from .writing import _emit_toml, policy_to_dict

__all__ = ["Policy", "PolicyLike"]


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

    # ---- construction (policy/reading.py, policy/presets.py) ---------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "<dict>") -> Policy:
        """Build from the TOML-shaped mapping (`description`, `[defaults]`, `[[rules]]`).

        Why: the one parser behind TOML, JSON and dict options; every error names `source` and
        the key path.
        """
        return reading.from_dict(cls, data, source=source)

    @classmethod
    def from_toml_text(cls, text: str, *, source: str = "<toml>") -> Policy:
        """Parse TOML text; malformed TOML reports the line and column."""
        return reading.from_toml_text(cls, text, source=source)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Policy:
        """Load a policy file: `.toml` (primary) or `.json`, chosen by suffix."""
        return reading.load(cls, path)

    @classmethod
    def preset_names(cls) -> list[str]:
        """Names of the bundled presets (files in sparselora_fx/presets/)."""
        return presets._preset_names()

    @classmethod
    def preset(cls, name: str) -> Policy:
        """A bundled preset by name; unknown names list the available ones."""
        return presets.preset(Policy, name)

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
            if value in presets._preset_names():
                return cls.preset(value)
            p = Path(value)
            if p.suffix.lower() in (".toml", ".json") or p.exists() or os.sep in value:
                return cls.load(p)
            return cls.preset(value)  # raises, listing the presets
        raise PolicyError(
            f"policy must be a Policy, a preset name, a path to a .toml/.json file, a dict or "
            f"None; got {type(value).__name__}."
        )

    # ---- output (policy/writing.py) ----------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The TOML-shaped mapping; `Policy.from_dict(p.to_dict()) == p`."""
        return policy_to_dict(self)

    def dump(self) -> str:
        """TOML text; `Policy.from_toml_text(p.dump()) == p`."""
        return _emit_toml(self.to_dict())

    # ---- importers (policy/importers.py) -----------------------------------------------------

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
        return importers.from_reference_yaml(cls, path, prefix=prefix)

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
        return importers.from_reference_json(cls, path, mode, tokens=tokens)
