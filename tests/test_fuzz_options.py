"""Seeded fuzz of what a careless user can hand the backend: policies and option dicts.

Every case, drawn from valid and invalid pieces, must end in success or in one of our error
types with a message; never an internal exception (a TypeError, KeyError, AttributeError ...)
and never a hang. Parsing only (``Settings.from_options``), no compile, so a few hundred cases
cost about a second.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from sparselora_fx import Policy
from sparselora_fx.errors import SparseLoRAError
from sparselora_fx.runtime.schedule import StepSchedule
from sparselora_fx.settings import Settings

CASES = 400

_SPARSITY = [0.0, 0.5, 0.9, 0.99, 1.0, -0.1, 2, "0.5", None, True, [0.5], {"start": 0.5, "end": 0.9},
             {"start": 0.5}, {"start": "a", "end": 0.9}, float("nan"), float("inf")]
_MATCH = ["model.layers.*.mlp", "model.layer.*.mlp", "re:model\\.layers\\.(1|2)\\.mlp", "re:(", "re:.*", "",
          "*", 5, None, ["model.layers.0", "model.layers.1"], ["x", 3]]
_LAYERS = ["0-1", "50-60", "1-0", [0, 1], [-1], [-5], "a-b", 3, -1, None, [], "0-", [1.5], True]
_ESTIMATOR = [{"kind": "svd", "rank": 8}, {"kind": "svd", "rank": 0}, {"kind": "svd", "rank": "8"},
              {"kind": "token_sample"}, {"kind": "token_sample", "fraction": 0.03}, {"kind": "nope"},
              {"kind": "svd", "samples": 4}, {}, "svd", None, 7, {"kind": "random"}]
_TOKENS = ["output_dense", "all_sparse", "dense", None, 1]
_INT = [0, 1, 5, 100, -3, 2.5, "10", None, True]


def _maybe(rng: random.Random, table: dict[str, Any], key: str, values: list[Any], p: float = 0.4) -> None:
    if rng.random() < p:
        table[key] = rng.choice(values)


def _policy(rng: random.Random) -> Any:
    kind = rng.random()
    if kind < 0.1:
        return rng.choice(["default", "dense", "llama3-8b-math10k", "no-such-preset", "missing.toml", "", 3, None])
    defaults: dict[str, Any] = {}
    for key in ("mlp", "attn", "attn_qk", "attn_vo"):
        _maybe(rng, defaults, key, _SPARSITY, 0.3)
    _maybe(rng, defaults, "estimator", _ESTIMATOR, 0.3)
    _maybe(rng, defaults, "tokens", _TOKENS, 0.2)
    _maybe(rng, defaults, "warmup_steps", _INT, 0.2)
    _maybe(rng, defaults, "warmup_fraction", [0.05, 0.0, 1.5, -1, "x"], 0.15)
    _maybe(rng, defaults, "total_steps", _INT, 0.15)
    _maybe(rng, defaults, "num_layers", _INT, 0.15)
    _maybe(rng, defaults, "dense_tokens", [0.25, 64, 0, -1, 1.5, "a"], 0.1)
    _maybe(rng, defaults, rng.choice(["mlpp", "estimater", "layers"]), [1], 0.05)
    rules = []
    for _ in range(rng.randrange(0, 4)):
        rule: dict[str, Any] = {}
        _maybe(rng, rule, "match", _MATCH, 0.8)
        _maybe(rng, rule, "layers", _LAYERS, 0.4)
        for key in ("mlp", "attn", "attn_vo", "dense"):
            _maybe(rng, rule, key, _SPARSITY + [True, False] if key == "dense" else _SPARSITY, 0.3)
        _maybe(rng, rule, rng.choice(["mach", "layer", "sparsity"]), [1], 0.05)
        rules.append(rule if rng.random() > 0.05 else rng.choice([[], "rule", None]))
    doc: dict[str, Any] = {}
    if defaults or rng.random() < 0.5:
        doc["defaults"] = defaults if rng.random() > 0.05 else rng.choice([[], "x", None])
    if rules:
        doc["rules"] = rules
    if rng.random() < 0.05:
        doc["unknown_top_level"] = 1
    return doc


def _options(rng: random.Random) -> Any:
    if rng.random() < 0.03:
        return rng.choice([[], "policy", 5])
    options: dict[str, Any] = {}
    if rng.random() < 0.8:
        options["policy"] = _policy(rng)
    _maybe(rng, options, "sparsity", _SPARSITY, 0.2)
    _maybe(rng, options, "inner", ["inductor", "aot_eager", "eager", "cuda", None, 3], 0.3)
    _maybe(rng, options, "inductor", [{}, {"max_autotune": True}, [], "fast", None], 0.1)
    _maybe(rng, options, "sparse_eval", [True, False, "no", 0, 1, None], 0.2)
    _maybe(rng, options, "progress", [True, False, "off", None], 0.2)
    _maybe(rng, options, "estimator_rank", _INT, 0.1)
    _maybe(rng, options, "layer", _INT, 0.1)
    _maybe(rng, options, "num_layers", _INT, 0.1)
    _maybe(rng, options, "schedule", [StepSchedule(0), StepSchedule(5), 5, "warmup", None], 0.1)
    _maybe(rng, options, rng.choice(["sparsty", "polcy", "mode"]), [1], 0.05)
    return options


def _outcome(options: Any) -> str:
    if isinstance(options, dict) and isinstance(options.get("policy"), dict):
        try:
            Policy.coerce(options["policy"])
        except SparseLoRAError as err:
            assert str(err).strip(), "an error without a message"
    try:
        Settings.from_options(options)  # type: ignore[arg-type]
    except SparseLoRAError as err:
        message = str(err)
        assert message.strip(), "an error without a message"
        return type(err).__name__
    return "ok"


def test_random_policies_and_options_end_in_success_or_a_clear_error(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # "missing.toml" and friends resolve here
    rng = random.Random(0)
    outcomes: dict[str, int] = {}
    for i in range(CASES):
        options = _options(rng)
        try:
            result = _outcome(options)
        except AssertionError:
            raise
        except Exception as err:  # an internal exception: the case and what it raised
            pytest.fail(f"case {i}: {options!r} raised {type(err).__name__}: {err}")
        outcomes[result] = outcomes.get(result, 0) + 1
    # Both ends are exercised: the pieces are not so broken that nothing parses, nor so tame that nothing fails.
    assert outcomes.get("ok", 0) >= 20 and sum(v for k, v in outcomes.items() if k != "ok") >= 100, outcomes
