"""Writing a policy out: the TOML-shaped mapping of a `Rule` / `Policy` and the TOML text of it.

`Policy.to_dict` / `Rule.to_dict` / `Policy.dump` (policy/model.py) call these; reading the
result back (policy/reading.py) gives an equal policy. JSON is `json.dumps(policy.to_dict())`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from ..errors import PolicyError
from .values import DEFAULT_DENSE_TOKENS, POLICY_KINDS, Ramp, SparsityValue, _layers_text


def rule_to_dict(rule: Any) -> dict[str, Any]:
    """The TOML table form of a `Rule`."""
    out: dict[str, Any] = {}
    if rule.match:
        out["match"] = rule.match[0] if len(rule.match) == 1 else list(rule.match)
    if rule.layers:
        text = _layers_text(rule.layers)
        out["layers"] = text[0] if len(text) == 1 else text
    out.update(_kinds_to_dict(rule.mlp, rule.attn_qk, rule.attn_vo))
    if rule.dense:
        out["dense"] = True
    return out


def policy_to_dict(policy: Any) -> dict[str, Any]:
    """The TOML-shaped mapping of a `Policy` (`description`, `[defaults]`, `[[rules]]`)."""
    defaults: dict[str, Any] = _kinds_to_dict(policy.mlp, policy.attn_qk, policy.attn_vo)
    defaults["tokens"] = policy.tokens
    if policy.dense_tokens != DEFAULT_DENSE_TOKENS:
        defaults["dense_tokens"] = policy.dense_tokens
    if policy.warmup_fraction is not None:
        defaults["warmup_fraction"] = policy.warmup_fraction
    else:
        defaults["warmup_steps"] = policy.warmup_steps
    if policy.total_steps is not None:
        defaults["total_steps"] = policy.total_steps
    if policy.num_layers is not None:
        defaults["num_layers"] = policy.num_layers
    specs = dict(policy.estimator)
    if len(set(specs.values())) == 1:
        defaults["estimator"] = specs["mlp"].to_dict()
    else:
        defaults["estimator"] = {k: specs[k].to_dict() for k in POLICY_KINDS}
    out: dict[str, Any] = {}
    if policy.description:
        out["description"] = policy.description
    out["defaults"] = defaults
    if policy.rules:
        out["rules"] = [rule.to_dict() for rule in policy.rules]
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
