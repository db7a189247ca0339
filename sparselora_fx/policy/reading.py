"""Reading a policy: from the TOML-shaped dict, TOML text, or a .toml / .json file.

Every error names where it came from (the file, `defaults`, `rules[i]`, the key) and, for
malformed TOML/JSON, the line and column. `Policy.from_dict` / `from_toml_text` / `load`
(policy/model.py) delegate here, handing over the class to build (`cls`, Policy or a subclass),
so this module never imports the model.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import PolicyError
from .presets import _preset_names
from .rules import Rule
from .values import (
    DEFAULT_DENSE_TOKENS,
    TOKEN_MODES,
    SparsityValue,
    _check_dense_tokens,
    _check_fraction,
    _check_int,
    _check_keys,
    _err,
    _parse_estimators,
    _parse_layers,
    _parse_match,
    _parse_sparsity,
)

__all__ = ["from_dict", "from_toml_text", "load"]

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


def from_dict(cls: Any, data: Mapping[str, Any], *, source: str = "<dict>") -> Any:
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
    rules = [_parse_rule(raw, f"{source}: rules[{i}]") for i, raw in enumerate(raw_rules)]
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


def _parse_rule(raw: Any, where: str) -> Rule:
    if not isinstance(raw, Mapping):
        raise _err(where, f"a rule must be a table, got {raw!r}.")
    _check_keys(raw, _RULE_KEYS, where)
    dense = raw.get("dense", False)
    if not isinstance(dense, bool):
        raise _err(where, f"dense must be true or false, got {dense!r}.")
    values = _parse_kind_values(raw, where)
    match = _parse_match(raw.get("match"), where)
    layers = _parse_layers(raw.get("layers"), where)  # outside the try: its errors already name `where`
    try:
        return Rule(match=match, layers=layers, dense=dense, **values)
    except PolicyError as exc:  # Rule's own checks name the Rule, not the file: re-say them with `where`
        message = str(exc).removeprefix(f"Rule(match={match!r}): ")
        raise _err(where, message) from None


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


def from_toml_text(cls: Any, text: str, *, source: str = "<toml>") -> Any:
    """Parse TOML text; malformed TOML reports the line and column."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _decode_error(source, "TOML", exc) from None
    return cls.from_dict(data, source=source)


def load(cls: Any, path: str | os.PathLike) -> Any:
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
    return cls.from_dict(parse_json(text, p), source=str(p))


def parse_json(text: str, path: Path) -> Any:
    """``text`` as JSON; a syntax error is a PolicyError at ``path:line:column``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise PolicyError(
            f"{path}:{exc.lineno}:{exc.colno}: malformed JSON at line {exc.lineno}, column "
            f"{exc.colno}: {exc.msg}."
        ) from None


# --------------------------------------------------------------------------------------------
# File helpers
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
