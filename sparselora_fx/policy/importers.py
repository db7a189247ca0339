"""Importers for the reference release's sparsity files: its YAML configs and JSON presets.

Why: users arrive with those files. `Policy.from_reference_yaml` / `Policy.from_reference_json`
(policy/model.py) delegate here, handing over the class to build (`cls`); the result is an
ordinary Policy (rules with layer ranges), so it dumps to this package's TOML.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..errors import PolicyError
from .reading import _read_text, parse_json
from .rules import Rule
from .values import DEFAULT_SVD_RANK, EstimatorSpec, _check_fraction, _check_int, _check_keys, _err

__all__ = ["from_reference_json", "from_reference_yaml"]


def from_reference_yaml(cls: Any, path: str | os.PathLike, *, prefix: str = "model.") -> Any:
    """The body of ``Policy.from_reference_yaml`` (its docstring says what is read); ``cls`` is the class to build."""
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


def from_reference_json(
    cls: Any, path: str | os.PathLike, mode: str | None = None, *, tokens: str = "output_dense"
) -> Any:
    """The body of ``Policy.from_reference_json`` (its docstring says what is read); ``cls`` is the class to build."""
    p = Path(path)
    source = str(p)
    text = _read_text(p)
    data = parse_json(text, p)
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

