"""Tests of the sparsity Policy: rule forms, semantics, files, presets, importers, errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from sparselora_fx.errors import PolicyError, SparseLoRAError
from sparselora_fx.policy import (
    EstimatorSpec,
    Policy,
    Ramp,
    Rule,
    layer_index,
    normalize_module_name,
)

KINDS = ("mlp", "attn_qk", "attn_vo")


def mlp_name(i: int) -> str:
    return f"model.layers.{i}.mlp.gate_proj"


def attn_name(i: int) -> str:
    return f"model.layers.{i}.self_attn.q_proj"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        "model.layers.3.mlp.gate_proj",
        "base_model.model.model.layers.3.mlp.gate_proj",
        "base_model.model.model.layers.3.mlp.gate_proj.base_layer",
        "_orig_mod.base_model.model.model.layers.3.mlp.gate_proj.base_layer",
        "_orig_mod.model.layers.3._orig_mod.mlp.gate_proj",
        "base_model.model.model.layers.3.mlp.gate_proj.lora_A.default",
        "base_model.model.model.layers.3.mlp.gate_proj.lora_B.my_adapter",
        "model.layers.3._checkpoint_wrapped_module.mlp.gate_proj",
    ],
)
def test_normalize_module_name(raw: str) -> None:
    assert normalize_module_name(raw) == "model.layers.3.mlp.gate_proj"


def test_normalize_keeps_plain_names_and_layer_index() -> None:
    assert normalize_module_name("lm_head") == "lm_head"
    assert normalize_module_name("base_layer_norm") == "base_layer_norm"
    assert layer_index("base_model.model.model.layers.17.self_attn.o_proj") == 17
    assert layer_index("model.layers.2.mlp.experts.7.up_proj") == 2
    assert layer_index("lm_head") is None


# ---------------------------------------------------------------------------------------------
# Rule forms and semantics
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern",
    [
        "model.layers.3.mlp.gate_proj",  # exact, full name
        "model.layers.3.mlp",  # exact parent
        "model.layers.3",  # exact grand-parent
        "model.layers.3.*",  # glob under a parent
        "model.layers.?.mlp",  # ? glob
        "*.mlp",  # glob crossing dots
        "re:model\\.layers\\.(3|5)\\.mlp",  # regex on a parent, full match
        "base_model.model.model.layers.3.mlp",  # PEFT spelling of the pattern
        "model.layers.3.mlp.gate_proj.base_layer",  # .base_layer spelling
        "re:base_model\\.model\\.model\\.layers\\.3\\..*",  # regex in PEFT spelling
    ],
)
def test_every_pattern_form_matches(pattern: str) -> None:
    policy = Policy(rules=(Rule(match=pattern, mlp=0.5),))
    for name in (
        mlp_name(3),
        "base_model.model." + mlp_name(3),
        "base_model.model." + mlp_name(3) + ".base_layer",
        "_orig_mod." + mlp_name(3),
    ):
        assert policy.resolve(name, "gated_mlp") == 0.5
        assert policy.resolve(name, "mlp") == 0.5


@pytest.mark.parametrize(
    "pattern",
    [
        "model.layers.3.mlp.gate",  # a prefix of a component is not a parent
        "model.layers.30",
        "model.layers.?.self_attn",
        "re:model\\.layers\\.3\\.mlp\\.gate",  # regex must fully match the name or a parent
        "re:layers\\.3\\.mlp",
    ],
)
def test_patterns_that_must_not_match(pattern: str) -> None:
    policy = Policy(mlp=0.1, rules=(Rule(match=pattern, mlp=0.5),))
    assert policy.resolve(mlp_name(3), "mlp") == 0.1
    assert policy.resolve(mlp_name(5), "mlp") == 0.1


def test_list_of_patterns_any_matches() -> None:
    policy = Policy.from_dict(
        {"rules": [{"match": ["model.layers.1", "re:model\\.layers\\.2"], "attn": 0.3}]}
    )
    assert [policy.resolve(attn_name(i), "attn_qk") for i in range(4)] == [None, 0.3, 0.3, None]
    assert [policy.resolve(attn_name(i), "attn_vo") for i in range(4)] == [None, 0.3, 0.3, None]


def test_first_rule_that_matches_and_sets_the_kind_wins() -> None:
    policy = Policy.from_dict(
        {
            "defaults": {"mlp": 0.1, "attn_qk": 0.2, "attn_vo": 0.3},
            "rules": [
                {"match": "model.layers.3", "attn_qk": 0.6},  # sets qk only
                {"match": "model.layers.*", "mlp": 0.7, "attn_vo": 0.8},
                {"match": "model.layers.3.mlp", "mlp": 0.9},  # shadowed by rule 1 for mlp
            ],
        }
    )
    assert policy.resolve(mlp_name(3), "gated_mlp") == 0.7
    assert policy.resolve(attn_name(3), "attn_qk") == 0.6
    assert policy.resolve(attn_name(3), "attn_vo") == 0.8
    assert policy.resolve(attn_name(4), "attn_qk") == 0.2  # no rule sets qk for layer 4
    assert policy.resolve("lm_head", "mlp") == 0.1  # defaults for unmatched modules


def test_dense_rule_sets_every_kind_and_zero_keeps_every_channel() -> None:
    policy = Policy.from_dict(
        {
            "defaults": {"mlp": 0.9, "attn": 0.5},
            "rules": [
                {"match": "model.layers.0", "dense": True},
                {"match": "model.layers.1", "attn_vo": 0},
                {"match": "model.layers.*", "mlp": 0.8},
            ],
        }
    )
    for kind in KINDS:
        assert policy.resolve(mlp_name(0), kind) is None
    assert policy.resolve(attn_name(1), "attn_vo") == 0.0  # sparse machinery, nothing dropped
    assert policy.resolve(attn_name(1), "attn_qk") == 0.5
    assert policy.resolve(mlp_name(1), "mlp") == 0.8
    assert policy.resolve(mlp_name(5), "mlp") == 0.8


def test_layers_selector_ints_ranges_negative() -> None:
    policy = Policy.from_dict(
        {
            "rules": [
                {"layers": [0, -1], "dense": True},
                {"match": "model.layers.*", "layers": ["2-3", 5], "mlp": 0.5},
                {"layers": "1-6", "mlp": 0.25},
            ]
        }
    )
    with pytest.raises(PolicyError, match="counts from the end.*bind"):
        policy.resolve(mlp_name(2), "mlp")
    got = [policy.resolve(mlp_name(i), "mlp", num_layers=8) for i in range(8)]
    assert got == [None, 0.25, 0.5, 0.5, 0.25, 0.5, 0.25, None]
    bound = policy.bind(names=[mlp_name(i) for i in range(8)])
    assert bound.num_layers == 8
    assert [bound.resolve(mlp_name(i), "mlp") for i in range(8)] == got
    assert bound.resolve("lm_head", "mlp") is None  # no layer index: layers rules skip it


def test_ramp_interpolates_with_depth() -> None:
    policy = Policy(mlp=Ramp(0.2, 0.8), attn_qk=0.4)
    n = 7
    for i in range(n):
        expected = 0.2 + (0.8 - 0.2) * i / (n - 1)
        assert policy.resolve(mlp_name(i), "mlp", num_layers=n) == pytest.approx(expected, abs=1e-15)
    assert policy.resolve("lm_head", "mlp", num_layers=n) is None  # outside the stack: dense
    with pytest.raises(PolicyError, match="depth ramp needs the number of layers"):
        policy.resolve(mlp_name(1), "mlp")
    with pytest.raises(PolicyError, match="beyond num_layers"):
        policy.resolve(mlp_name(9), "mlp", num_layers=n)
    zero_start = Policy(attn_vo=Ramp(0.0, 0.5), num_layers=3)
    assert zero_start.resolve(attn_name(0), "attn_vo") is None  # ramp value 0 -> dense
    assert zero_start.resolve(attn_name(2), "attn_vo") == 0.5


def test_unknown_group_kind() -> None:
    with pytest.raises(PolicyError, match="unknown group kind 'attn'.*attn_qk or attn_vo"):
        Policy().resolve(attn_name(0), "attn")
    with pytest.raises(PolicyError, match="valid kinds: gated_mlp, mlp, attn_qk, attn_vo"):
        Policy().resolve(attn_name(0), "ffn")


def test_rule_matches_helper() -> None:
    with pytest.raises(PolicyError, match="sets nothing"):
        Rule(match="x")
    rule = Rule(match="model.layers.*", layers=[-1], dense=True)
    assert rule.matches(mlp_name(3), num_layers=4)
    assert not rule.matches(mlp_name(2), num_layers=4)


# ---------------------------------------------------------------------------------------------
# Estimators, warm-up, tokens, with_sparsity
# ---------------------------------------------------------------------------------------------


def test_estimator_fraction_and_random_kinds() -> None:
    spec = Policy.from_dict({"defaults": {"estimator": {"mlp": {"kind": "token_sample", "samples": 16,
                                                                "fraction": 0.5}}}}).estimator_for("mlp")
    assert (spec.samples, spec.fraction, spec.describe()) == (16, 0.5, "token_sample:16+50%")
    assert EstimatorSpec("random", seed=3).to_dict() == {"kind": "random", "seed": 3}
    with pytest.raises(PolicyError, match=r"fraction must be a number in \(0, 1\].*got 1.5"):
        EstimatorSpec("token_sample", fraction=1.5)
    with pytest.raises(PolicyError, match="'fraction' does not apply to estimator kind 'svd'"):
        EstimatorSpec("svd", fraction=0.1)
    with pytest.raises(PolicyError, match="'rank' does not apply to estimator kind 'random'"):
        EstimatorSpec("random", rank=4)


def test_estimator_forms() -> None:
    p = Policy()  # the measured defaults: exact activations of 3% of the tokens (>= 64), MLP and V/O
    assert p.estimator_for("gated_mlp") == EstimatorSpec("token_sample", samples=64, fraction=0.03)
    assert p.estimator_for("attn_vo") == EstimatorSpec("token_sample", samples=64, fraction=0.03)
    assert p.estimator_for("attn_qk") == EstimatorSpec("svd", rank=8)
    one = Policy.from_dict({"defaults": {"estimator": {"kind": "token_sample", "samples": 32}}})
    for kind in ("mlp", "attn_qk", "attn_vo"):
        spec = one.estimator_for(kind)
        assert (spec.kind, spec.rank, spec.samples, spec.seed) == ("token_sample", None, 32, 0)
    per = Policy.from_dict(
        {
            "defaults": {
                "estimator": {
                    "mlp": {"kind": "svd", "rank": 16},
                    "attn": {"kind": "token_sample", "samples": 8, "seed": 3},
                }
            }
        }
    )
    assert per.estimator_for("mlp") == EstimatorSpec("svd", rank=16)
    assert per.estimator_for("attn_qk") == EstimatorSpec("token_sample", samples=8, seed=3)
    assert per.estimator_for("attn_vo") == per.estimator_for("attn_qk")
    partial = Policy(estimator={"attn_vo": EstimatorSpec("svd", rank=4)})
    assert partial.estimator_for("attn_vo").rank == 4
    assert partial.estimator_for("mlp") == EstimatorSpec("token_sample", samples=64, fraction=0.03)


@pytest.mark.parametrize(
    "estimator, message",
    [
        ({"kind": "svdd"}, "unknown estimator kind 'svdd'. Did you mean 'svd'"),
        ({"kind": "svd", "samples": 4}, "unknown key 'samples'.*Valid keys here: kind, rank"),
        ({"kind": "svd", "rank": 0}, "rank must be an integer >= 1"),
        ({"kind": "token_sample", "seed": -1}, "seed must be an integer >= 0"),
        ({"mlp": {"kind": "svd"}, "rank": 4}, "mixes per-kind estimator tables"),
        ({"attn": {}, "attn_qk": {}}, "cannot be combined"),
    ],
)
def test_estimator_errors(estimator: dict, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        Policy.from_dict({"defaults": {"estimator": estimator}}, source="est.toml")


def test_estimator_spec_rejects_foreign_parameter() -> None:
    with pytest.raises(PolicyError, match="'samples' does not apply to estimator kind 'svd'"):
        EstimatorSpec("svd", samples=3)


@pytest.fixture
def registered_estimator():
    """A new estimator kind, `test_constant` (knobs: seed), registered for one test only."""
    import dataclasses
    from typing import ClassVar

    import torch

    from sparselora_fx import estimator_registry
    from sparselora_fx.runtime import estimators as E

    @dataclasses.dataclass(frozen=True)
    class ConstantEstimator(E.Estimator):
        kind: ClassVar[str] = "test_constant"
        seed: int = 0

        def estimate(self, x2d, weight, bias, mask=None):
            return torch.ones(1, weight.shape[0], dtype=x2d.dtype)

    E.register_estimator(ConstantEstimator)
    try:
        yield ConstantEstimator
    finally:
        estimator_registry.unregister(ConstantEstimator.kind)
    assert "test_constant" not in estimator_registry.kinds()


def test_registered_estimator_kind_can_be_named_in_a_policy(tmp_path: Path, registered_estimator) -> None:
    from sparselora_fx.runtime import estimators as E

    spec = EstimatorSpec("test_constant", seed=3)
    from_dict = Policy.from_dict({"defaults": {"mlp": 0.5, "estimator": {"mlp": {"kind": "test_constant", "seed": 3}}}})
    assert from_dict.estimator_for("gated_mlp") == spec
    path = write(tmp_path, "p.toml", "[defaults]\nmlp = 0.5\nestimator = { kind = 'test_constant', seed = 3 }\n")
    loaded = Policy.load(path)
    assert all(loaded.estimator_for(k) == spec for k in KINDS)
    assert Policy.from_toml_text(loaded.dump()) == loaded  # and it writes back out
    assert spec.to_dict() == {"kind": "test_constant", "seed": 3} and spec.describe() == "test_constant"
    assert E.get_estimator("test_constant", rank=8, seed=3) == registered_estimator(seed=3)
    assert "test_constant" in E.estimator_kinds()
    with pytest.raises(PolicyError, match=r"unknown key 'rank'.*Valid keys here: kind, seed"):
        Policy.from_dict({"defaults": {"estimator": {"kind": "test_constant", "rank": 4}}})
    with pytest.raises(PolicyError, match="Valid kinds: svd, token_sample, random, test_constant"):
        Policy.from_dict({"defaults": {"estimator": {"kind": "no_such_kind"}}})
    with pytest.raises(PolicyError, match="unknown estimator kind 'test_constnt'. Did you mean 'test_constant'"):
        EstimatorSpec("test_constnt")


def test_unregistered_estimator_kind_is_refused_listing_the_kinds() -> None:
    import dataclasses

    from sparselora_fx import estimator_registry

    assert "test_constant" not in estimator_registry.kinds()  # the fixture cleaned up
    with pytest.raises(PolicyError, match=r"unknown estimator kind 'test_constant'\. Valid kinds: svd, token_sample, random\."):
        Policy.from_dict({"defaults": {"estimator": {"kind": "test_constant"}}})
    with pytest.raises(SparseLoRAError, match="built in"):
        estimator_registry.unregister("svd")
    # The spec's fields are the knobs the registry hands out.
    assert tuple(f.name for f in dataclasses.fields(EstimatorSpec))[1:] == estimator_registry.KNOBS


def test_warmup() -> None:
    assert Policy(warmup_steps=12).warmup_steps_for(None) == 12
    assert Policy(warmup_steps=12).warmup_steps_for(1000) == 12
    frac = Policy(warmup_fraction=0.05)
    assert frac.warmup_steps_for(1000) == 50  # exact decimal, not 51
    assert frac.warmup_steps_for(37) == 2  # ceil(1.85)
    assert Policy(warmup_fraction=0.29).warmup_steps_for(100) == 29
    assert Policy(warmup_fraction=0.05, total_steps=200).warmup_steps_for() == 10
    assert Policy(warmup_fraction=0.05, total_steps=200).warmup_steps_for(400) == 20
    with pytest.raises(PolicyError, match="needs the total number of optimizer steps"):
        frac.warmup_steps_for()
    with pytest.raises(PolicyError, match="both warmup_steps = 3 and warmup_fraction"):
        Policy(warmup_steps=3, warmup_fraction=0.1)
    with pytest.raises(PolicyError, match="warmup_fraction = 1.0 is outside"):
        Policy(warmup_fraction=1.0)
    with pytest.raises(PolicyError, match="warmup_steps must be an integer >= 0"):
        Policy(warmup_steps=-1)


def test_tokens_mode() -> None:
    assert Policy().tokens == "all_sparse"
    assert Policy(tokens="output_dense").tokens == "output_dense"
    with pytest.raises(PolicyError, match="tokens = 'output'.*output_dense, all_sparse"):
        Policy.from_dict({"defaults": {"tokens": "output"}}, source="t.toml")


def test_with_sparsity_overrides_only_sparsities() -> None:
    base = Policy.preset("llama3-8b-math10k")
    flat = base.with_sparsity(0.6)
    assert flat.rules == ()
    for i in range(32):
        for kind in ("gated_mlp", "attn_qk", "attn_vo"):
            assert flat.resolve(mlp_name(i), kind) == 0.6
    assert flat.estimator == base.estimator
    assert (flat.tokens, flat.warmup_fraction, flat.warmup_steps) == (
        base.tokens,
        base.warmup_fraction,
        base.warmup_steps,
    )
    with pytest.raises(PolicyError, match="sparsity = 1.0 is outside"):
        base.with_sparsity(1.0)


# ---------------------------------------------------------------------------------------------
# Round trip, files
# ---------------------------------------------------------------------------------------------


def _rich_policy() -> Policy:
    return Policy(
        mlp=Ramp(0.5, 0.9),
        attn_qk=0.25,
        attn_vo=0.125,
        rules=(
            Rule(match=("re:model\\.layers\\.(1|2)\\.mlp",), mlp=0.3),
            Rule(match=("model.layers.4", "model.layers.5.*"), attn_qk=0.5, attn_vo=0.5),
            Rule(layers=(0, -1), dense=True),
            Rule(match=("model.layers.?",), layers=("3-6", 9), attn_vo=Ramp(0.1, 0.2)),
            Rule(match=('weird "quoted" name',), mlp=0.0),
        ),
        estimator={
            "mlp": EstimatorSpec("svd", rank=16),
            "attn_qk": EstimatorSpec("token_sample", samples=12, seed=5),
        },
        warmup_fraction=0.07,
        total_steps=300,
        tokens="output_dense",
        num_layers=12,
        description='A "rich" policy\nwith two lines and a tab\t.',
    )


@pytest.mark.parametrize("name", ["default", "dense", "llama3-8b-math10k", "llama3-8b-csr", "llama3-8b-glue"])
def test_round_trip_presets(name: str) -> None:
    policy = Policy.preset(name)
    again = Policy.from_toml_text(policy.dump())
    assert again == policy
    assert hash(again) == hash(policy)
    assert Policy.from_dict(policy.to_dict()) == policy


def test_round_trip_rich_policy_and_json(tmp_path: Path) -> None:
    policy = _rich_policy()
    text = policy.dump()
    assert Policy.from_toml_text(text) == policy
    toml_file = write(tmp_path, "p.toml", text)
    json_file = write(tmp_path, "p.json", json.dumps(policy.to_dict()))
    assert Policy.load(toml_file) == policy
    assert Policy.load(str(json_file)) == policy
    assert Policy.load(toml_file).source == str(toml_file)
    # behaviour survives the trip too, not only equality
    loaded = Policy.load(json_file)
    for i in range(12):
        for kind in KINDS:
            assert loaded.resolve(mlp_name(i), kind) == policy.resolve(mlp_name(i), kind)
    changed = Policy.from_toml_text(text.replace("0.125", "0.375"))
    assert changed != policy


def test_policy_from_toml_file_every_rule_form(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "policy.toml",
        """
description = "every form"

[defaults]
mlp = 0.4
attn_qk = 0.3
tokens = "output_dense"
warmup_steps = 10

[defaults.estimator]
mlp = { kind = "svd", rank = 4 }

[[rules]]
match = "model.layers.0"
dense = true

[[rules]]
match = ["model.layers.1.mlp", "model.layers.2.*"]
mlp = 0.9

[[rules]]
match = 're:model\\.layers\\.[3-4]\\.self_attn'
attn = 0.6

[[rules]]
layers = [-1]
mlp = { ramp = [0.5, 0.7] }
""",
    )
    p = Policy.load(path).bind(num_layers=6)
    assert p.description == "every form"
    assert p.warmup_steps_for() == 10 and p.tokens == "output_dense"
    assert p.estimator_for("mlp").rank == 4
    assert [p.resolve(mlp_name(i), "mlp") for i in range(6)] == [None, 0.9, 0.9, 0.4, 0.4, 0.7]
    assert [p.resolve(attn_name(i), "attn_qk") for i in range(6)] == [None, 0.3, 0.3, 0.6, 0.6, 0.3]
    assert [p.resolve(attn_name(i), "attn_vo") for i in range(6)] == [None, None, None, 0.6, 0.6, None]


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, pieces",
    [
        ("[defualts]\nmlp = 0.5\n", ["bad.toml", "unknown key 'defualts'", "Did you mean 'defaults'", "description, defaults, rules"]),
        ("mlp = 0.5\n", ["unknown key 'mlp'", "under [defaults]"]),
        ("[defaults]\nmpl = 0.5\n", ["bad.toml: defaults", "'mpl'", "Did you mean 'mlp'", "warmup_fraction"]),
        ("[[rules]]\nmatch = 'a'\ndens = true\n", ["bad.toml: rules[0]", "'dens'", "Did you mean 'dense'", "match, layers"]),
        ("[defaults]\nmlp = 1.5\n", ["bad.toml: defaults", "mlp = 1.5 is outside [0, 1)"]),
        ("[defaults]\nattn = -0.1\n", ["bad.toml: defaults", "attn = -0.1 is outside [0, 1)"]),
        ("[[rules]]\nmatch = 'a'\nmlp = 1\n", ["bad.toml: rules[0]", "mlp = 1.0 is outside [0, 1)"]),
        ("[[rules]]\nmatch = 'a'\nmlp = {ramp = [0.2, 1.0]}\n", ["rules[0]", "mlp.ramp[1] = 1.0 is outside"]),
        ("[[rules]]\nmatch = 'a'\nmlp = 'high'\n", ["rules[0]", "mlp must be a number in [0, 1)"]),
        ("[[rules]]\nmatch = 'a'\nmlp = 0.5\n[[rules]]\nmatch = 'a'\nattn = 0.5\n", ["bad.toml", "rules[1] selects the same modules as rules[0]"]),
        ("[[rules]]\nmatch = 'a'\n", ["rules[0]", "the rule sets nothing"]),
        ("[[rules]]\nmatch = 'a'\ndense = true\nmlp = 0.5\n", ["rules[0]", "dense = true already makes every kind dense"]),
        ("[[rules]]\nmlp = 0.5\n", ["rules[0]", "needs `match` patterns, a `layers` selector"]),
        ("[[rules]]\nmatch = 'a'\nattn = 0.5\nattn_qk = 0.5\n", ["rules[0]", "cannot be combined with attn_qk"]),
        ("[[rules]]\nmatch = 're:model(('\nmlp = 0.5\n", ["rules[0]", "invalid regex"]),
        ("[[rules]]\nlayers = ['5-3']\nmlp = 0.5\n", ["rules[0]", "empty or mixes signs"]),
        ("[[rules]]\nlayers = ['x']\nmlp = 0.5\n", ["rules[0]", "neither an int nor"]),
        ("[defaults]\nestimator = {kind = 'pca'}\n", ["bad.toml: defaults.estimator", "unknown estimator kind 'pca'", "svd, token_sample"]),
        ("[defaults]\ntotal_steps = 0\n", ["bad.toml: defaults", "total_steps must be an integer >= 1"]),
    ],
)
def test_file_errors(tmp_path: Path, text: str, pieces: list[str]) -> None:
    path = write(tmp_path, "bad.toml", text)
    with pytest.raises(PolicyError) as info:
        Policy.load(path)
    message = str(info.value)
    for piece in pieces:
        assert piece in message, (piece, message)
    assert isinstance(info.value, SparseLoRAError)


def test_malformed_toml_and_json_report_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "broken.toml", "[defaults]\nmlp = 0.5\nattn = = 3\n")
    with pytest.raises(PolicyError, match=r"broken\.toml:3:\d+: malformed TOML at line 3, column \d+"):
        Policy.load(path)
    path = write(tmp_path, "broken.json", '{\n  "defaults": {\n    "mlp": 0.5,\n  }\n}\n')
    with pytest.raises(PolicyError, match=r"broken\.json:4:3: malformed JSON at line 4, column 3"):
        Policy.load(path)


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="policy file not found.*llama3-8b-math10k"):
        Policy.load(tmp_path / "missing.toml")
    with pytest.raises(PolicyError, match="unsupported policy file type '.yaml'"):
        Policy.load(write(tmp_path, "p.yaml", "a: 1"))


def test_unknown_preset_lists_names() -> None:
    with pytest.raises(PolicyError) as info:
        Policy.preset("llama3-8b-math10")
    message = str(info.value)
    assert "Did you mean 'llama3-8b-math10k'" in message
    for name in ("default", "dense", "llama3-8b-csr", "llama3-8b-glue", "llama3-8b-math10k"):
        assert name in message


def test_coerce(tmp_path: Path) -> None:
    p = Policy(mlp=0.5)
    assert Policy.coerce(p) is p
    assert Policy.coerce("llama3-8b-glue") == Policy.preset("llama3-8b-glue")
    assert Policy.coerce(None) == Policy.preset("default")
    assert Policy.coerce({"defaults": {"mlp": 0.5}}) == p
    path = write(tmp_path, "c.toml", "[defaults]\nmlp = 0.5\n")
    assert Policy.coerce(path) == p
    assert Policy.coerce(str(path)) == p
    with pytest.raises(PolicyError, match="unknown policy preset 'nonsense'"):
        Policy.coerce("nonsense")
    with pytest.raises(PolicyError, match="got int"):
        Policy.coerce(3)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Warnings
# ---------------------------------------------------------------------------------------------


def test_check_names_warns_with_nearest_names() -> None:
    names = [mlp_name(i) for i in range(4)] + [attn_name(i) for i in range(4)]
    good = Policy.from_dict(
        {"rules": [{"match": "model.layers.1.mlp", "mlp": 0.5}, {"layers": [-1], "attn": 0.2}]}
    )
    assert good.check_names(names) == []
    bad = Policy.from_dict(
        {
            "rules": [
                {"match": ["model.layers.1.mpl", "model.layers.2"], "mlp": 0.5},
                {"match": "re:decoder\\..*", "mlp": 0.4},
                {"layers": "10-12", "mlp": 0.3},
                {"match": "model.layers.1.*", "layers": 3, "mlp": 0.2},
            ]
        },
        source="w.toml",
    )
    warnings = bad.check_names(["base_model.model." + n + ".base_layer" for n in names])
    assert len(warnings) == 4, warnings
    first = warnings[0]
    assert first.startswith("w.toml: rules[0]: match pattern 'model.layers.1.mpl' matches no module")
    nearest = first.split("nearest names: ")[1].rstrip(".").split(", ")
    assert len(nearest) == 3 and nearest[0] == "model.layers.1.mlp"
    assert "rules[1]" in warnings[1] and "'re:decoder\\\\..*'" in warnings[1]
    assert "rules[2]: layers ['10-12'] select no module (layer indices present: 0..3)" in warnings[2]
    assert "rules[3]" in warnings[3] and "no module satisfies both" in warnings[3]


# ---------------------------------------------------------------------------------------------
# Regexes that could backtrack for ever are refused when the policy is loaded
# ---------------------------------------------------------------------------------------------

CATASTROPHIC = [
    "re:(.*.*...)*x",  # the reported hang
    "re:(a+)+",
    "re:(.*)*mlp",
    "re:model\\.(\\w+\\.?)*x",
    "re:(.|.)*x",  # a repeated alternation whose branches match the same text
    "re:.*.*.*.*.*.*.*.*.*.*x",  # ten `.*`: polynomial, but 30**10
]

_LOAD_THEN_RESOLVE = """
import sys, json
from sparselora_fx.errors import PolicyError
from sparselora_fx.policy import Policy
out = []
for pattern in json.loads(sys.argv[1]):
    text = "[[rules]]\\nmatch = " + json.dumps(pattern) + "\\nmlp = 0.5\\n"
    try:
        policy = Policy.from_toml_text(text, source="hang.toml")
    except PolicyError as exc:
        out.append(str(exc))
        continue
    policy.resolve("base_model.model.model.layers.17.mlp.gate_proj.base_layer", "gated_mlp")  # may hang
    out.append("LOADED")
print(json.dumps(out))
"""


def test_catastrophic_regex_is_refused_at_load_instead_of_hanging_resolve() -> None:
    import subprocess

    try:  # in a child process, so that a regression fails here instead of hanging the test run
        done = subprocess.run([sys.executable, "-c", _LOAD_THEN_RESOLVE, json.dumps(CATASTROPHIC)],
                              capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("loading (and resolving) a catastrophic regex did not finish in 20 s")
    assert done.returncode == 0, done.stderr
    messages = json.loads(done.stdout.strip().splitlines()[-1])
    for pattern, message in zip(CATASTROPHIC, messages):
        assert message.startswith(f"hang.toml: rules[0]: match {pattern!r} could take for ever"), message
        assert "Write it without repeating a repeat: a glob (`model.layers.*.mlp`)" in message


def test_catastrophic_regex_is_refused_in_python_too() -> None:
    with pytest.raises(PolicyError, match="a repeated group holds another unbounded repeat"):
        Rule(match="re:(a+)+", mlp=0.5)
    with pytest.raises(PolicyError, match="<policy dict>: rules\\[1\\]: match 're:\\(\\.\\|\\.\\)\\*x'"):
        Policy.coerce({"rules": [{"match": "model.layers.0", "mlp": 0.5}, {"match": "re:(.|.)*x", "mlp": 0.5}]})


@pytest.mark.parametrize(
    ("pattern", "layers"),
    [
        ("re:model\\.layers\\.(1|2)\\.mlp", [1, 2]),
        ("re:.*mlp", [0, 1, 2, 3]),
        ("re:.*\\.layers\\.\\d+\\.(mlp|self_attn)\\..*", [0, 1, 2, 3]),
        ("re:model\\.layers\\.(1[4-9]|2[0-3]|[2-3])\\.mlp", [2, 3]),
        ("re:(?:model\\.)?layers\\.[0-2]\\.mlp", [0, 1, 2]),  # an optional group is not a repeat
        ("re:model\\.[^.]+\\.[13]\\.mlp", [1, 3]),
    ],
)
def test_ordinary_regexes_still_match(pattern: str, layers: list[int]) -> None:
    policy = Policy.from_dict({"rules": [{"match": pattern, "mlp": 0.5}]})
    got = [i for i in range(4) if policy.resolve("base_model.model." + mlp_name(i), "gated_mlp") == 0.5]
    assert got == layers


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------

# The release's published values (fraction DROPPED, layers 0-indexed of 32).
PRESET_SPECS = {
    "llama3-8b-math10k": (
        {i: 0.99 for i in range(3, 31)},
        {i: 0.75 for i in [*range(14, 20), *range(21, 24), *range(25, 30)]},
        "output_dense",
    ),
    "llama3-8b-csr": (
        {i: 0.97 for i in range(17, 31)},
        {i: 0.2 for i in [*range(17, 20), *range(21, 24), *range(25, 30)]},
        "output_dense",
    ),
    "llama3-8b-glue": (
        {**{i: 0.95 for i in range(17, 31)}, 31: 0.5},
        {i: 0.75 for i in range(17, 30)},
        "all_sparse",
    ),
}


@pytest.mark.parametrize("name", sorted(PRESET_SPECS))
def test_reference_presets_every_layer(name: str) -> None:
    mlp, attn, tokens = PRESET_SPECS[name]
    p = Policy.preset(name)
    for i in range(32):
        for name_i in (mlp_name(i), "base_model.model." + mlp_name(i) + ".base_layer"):
            assert p.resolve(name_i, "gated_mlp") == mlp.get(i), (name, i)
            assert p.resolve(name_i, "mlp") == mlp.get(i), (name, i)
        for kind in ("attn_qk", "attn_vo"):
            assert p.resolve(attn_name(i), kind) == attn.get(i), (name, i, kind)
            assert p.resolve(f"model.layers.{i}.self_attn.v_proj", kind) == attn.get(i)
    assert p.tokens == tokens
    assert p.warmup_fraction == 0.05 and p.warmup_steps_for(1000) == 50
    assert p.estimator_for("mlp") == EstimatorSpec("svd", rank=8)
    assert p.check_names([mlp_name(i) for i in range(32)] + [attn_name(i) for i in range(32)]) == []


@pytest.mark.parametrize("depth", [3, 8, 32])
def test_default_preset_any_depth(depth: int) -> None:
    p = Policy.preset("default")
    with pytest.raises(PolicyError, match="bind"):
        p.resolve(mlp_name(1), "mlp")
    bound = p.bind(names=[mlp_name(i) for i in range(depth)])
    for kind, (lo, hi) in (("mlp", (0.5, 0.9)), ("attn_qk", (0.0, 0.5)), ("attn_vo", (0.0, 0.5))):
        got = [bound.resolve(mlp_name(i), kind) for i in range(depth)]
        assert got[0] is None and got[-1] is None
        for i in range(1, depth - 1):
            assert got[i] == pytest.approx(lo + (hi - lo) * i / (depth - 1), abs=1e-15)
        middle = got[1:-1]
        assert middle == sorted(middle)
    assert bound.resolve("lm_head", "mlp") is None
    assert Policy.preset("dense").resolve(mlp_name(3), "mlp") is None


# ---------------------------------------------------------------------------------------------
# Importers
# ---------------------------------------------------------------------------------------------


def _reference_yaml(mlp: dict, attn: dict, start: float, skip: bool, mode: str = "svd_8") -> str:
    lines = [
        "#* General Settings",
        f"start_step: {start}",
        f'mode: "{mode}"',
        f"skip_output_tokens: {'True' if skip else 'False'}",
        'ffn_sparsity: "ffn=informative"',
        'qkvo_sparsity: "qkv=informative"',
        "sparsity:",
    ]
    for i in range(32):
        lines.append(f"  layers.{i}.mlp: {mlp.get(i, 0)}")
        lines.append(f"  layers.{i}.self_attn: {attn.get(i, 0)}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("name", sorted(PRESET_SPECS))
def test_from_reference_yaml_matches_preset(tmp_path: Path, name: str) -> None:
    mlp, attn, tokens = PRESET_SPECS[name]
    path = write(tmp_path, f"{name}.yaml", _reference_yaml(mlp, attn, 0.05, tokens == "output_dense"))
    imported = Policy.from_reference_yaml(path)
    preset = Policy.preset(name)
    for i in range(32):
        for kind in ("mlp", "attn_qk", "attn_vo"):
            for n in (mlp_name(i), attn_name(i)):
                assert imported.resolve(n, kind) == preset.resolve(n, kind), (i, kind)
    assert imported.tokens == preset.tokens
    assert imported.warmup_steps_for(1000) == 50
    assert imported.estimator_for("attn_qk") == EstimatorSpec("svd", rank=8)
    assert Policy.from_toml_text(imported.dump()) == imported


def test_from_reference_yaml_modes_and_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dense = Policy.from_reference_yaml(
        write(tmp_path, "d.yaml", 'mode: "dense"\nsparsity:\n  layers.0.mlp: 0\n')
    )
    assert dense.rules == () and dense.resolve(mlp_name(0), "mlp") is None
    rank4 = Policy.from_reference_yaml(
        write(tmp_path, "r.yaml", 'start_step: 20\nmode: "svd_4"\nsparsity:\n  layers.2.mlp: 0.5\n'),
        prefix="",
    )
    assert rank4.estimator_for("mlp").rank == 4 and rank4.warmup_steps_for() == 20
    assert rank4.resolve("layers.2.mlp.up_proj", "mlp") == 0.5
    assert rank4.resolve(mlp_name(2), "mlp") is None
    with pytest.raises(PolicyError, match="mode 'oracle' is not understood"):
        Policy.from_reference_yaml(write(tmp_path, "m.yaml", "mode: oracle\n"))
    with pytest.raises(PolicyError, match="cannot read module key 'layers.2.ffn'"):
        Policy.from_reference_yaml(write(tmp_path, "k.yaml", "sparsity:\n  layers.2.ffn: 0.5\n"))
    with pytest.raises(PolicyError, match="unknown key 'start_stp'.*Did you mean 'start_step'"):
        Policy.from_reference_yaml(write(tmp_path, "u.yaml", "start_stp: 0.1\n"))
    with pytest.raises(PolicyError, match=r"layers\.2\.mlp = 1\.0 is outside"):
        Policy.from_reference_yaml(write(tmp_path, "v.yaml", "sparsity:\n  layers.2.mlp: 1.0\n"))
    with pytest.raises(PolicyError, match=r"y\.yaml:3:3: malformed YAML"):
        Policy.from_reference_yaml(write(tmp_path, "y.yaml", "sparsity:\n  - a\n  b: c\n"))
    monkeypatch.setitem(sys.modules, "yaml", None)
    with pytest.raises(PolicyError, match="pip install pyyaml"):
        Policy.from_reference_yaml(tmp_path / "d.yaml")


def _reference_json(tmp_path: Path) -> Path:
    """A fixture shaped like the release's JSON presets: two modes of per-layer sparsity."""
    o1, o2 = {}, {}
    mlp1, attn1, _ = PRESET_SPECS["llama3-8b-csr"]
    mlp2, attn2, _ = PRESET_SPECS["llama3-8b-math10k"]
    for i in range(32):
        o1[f"model.layers.{i}.mlp"] = mlp1.get(i, 0)
        o1[f"model.layers.{i}.self_attn"] = attn1.get(i, 0)
        o2[f"model.layers.{i}.mlp"] = mlp2.get(i, 0)
        o2[f"model.layers.{i}.self_attn"] = attn2.get(i, 0)
    data = {
        "base_model": "some/base-model",
        "predictor_rank": 8,
        "modes": {"o1": {"layer_sparsity": o1}, "o2": {"layer_sparsity": o2}},
    }
    return write(tmp_path, "config.json", json.dumps(data, indent=2))


def test_from_reference_json(tmp_path: Path) -> None:
    path = _reference_json(tmp_path)
    for mode, preset in (("o1", "llama3-8b-csr"), ("o2", "llama3-8b-math10k")):
        imported = Policy.from_reference_json(path, mode)
        expected = Policy.preset(preset)
        for i in range(32):
            for kind in KINDS:
                for n in (mlp_name(i), attn_name(i)):
                    assert imported.resolve(n, kind) == expected.resolve(n, kind)
        assert imported.tokens == "output_dense" and imported.warmup_steps_for() == 0
        assert imported.estimator_for("mlp").rank == 8
    with pytest.raises(PolicyError, match="several modes \\(o1, o2\\); pass mode"):
        Policy.from_reference_json(path)
    with pytest.raises(PolicyError, match="mode 'o3' not found; available modes: o1, o2"):
        Policy.from_reference_json(path, "o3")
    single = write(
        tmp_path,
        "single.json",
        json.dumps({"predictor_rank": 4, "start_step": 0.1, "modes": {"x": {"layer_sparsity": {"model.layers.1.mlp": 0.5}}}}),
    )
    p = Policy.from_reference_json(single, tokens="all_sparse")
    assert p.estimator_for("attn_vo").rank == 4 and p.warmup_steps_for(100) == 10
    assert p.tokens == "all_sparse" and p.resolve(mlp_name(1), "mlp") == 0.5


# ---------------------------------------------------------------------------------------------
# Real transformers module names
# ---------------------------------------------------------------------------------------------


def _linear_names(model) -> list[str]:
    import torch

    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def test_llama3_8b_meta_model_names() -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    names = _linear_names(model)
    assert len(names) == 32 * 7 + 1
    p = Policy.preset("llama3-8b-math10k")
    assert p.check_names(names) == []
    mlp, attn, _ = PRESET_SPECS["llama3-8b-math10k"]
    for name in names:
        i = layer_index(name)
        if name.endswith(("gate_proj", "up_proj", "down_proj")):
            assert p.resolve(name, "gated_mlp") == mlp.get(i)
        elif name.endswith(("q_proj", "k_proj")):
            assert p.resolve(name, "attn_qk") == attn.get(i)
        elif name.endswith(("v_proj", "o_proj")):
            assert p.resolve(name, "attn_vo") == attn.get(i)
        else:
            assert name == "lm_head"
            assert all(p.resolve(name, k) is None for k in KINDS)
    bound = Policy.preset("default").bind(names=names)
    assert bound.num_layers == 32


def test_peft_wrapped_names_resolve_like_plain_names() -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=32,
    )
    plain = transformers.LlamaForCausalLM(config)
    plain_names = _linear_names(plain)
    lora = peft.LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    wrapped = peft.get_peft_model(transformers.LlamaForCausalLM(config), lora)
    wrapped_names = _linear_names(wrapped)
    assert any(n.startswith("base_model.model.") and n.endswith(".base_layer") for n in wrapped_names)
    assert sorted({normalize_module_name(n) for n in wrapped_names}) == sorted(plain_names)
    policy = Policy.from_dict(
        {
            "defaults": {"mlp": {"ramp": [0.2, 0.8]}, "attn": 0.3},
            "rules": [
                {"layers": [0, -1], "dense": True},
                {"match": "base_model.model.model.layers.2.self_attn", "attn_qk": 0.6},
            ],
        }
    ).bind(names=wrapped_names)
    assert policy.check_names(wrapped_names) == []
    for name in wrapped_names:
        for kind in KINDS:
            assert policy.resolve(name, kind) == policy.resolve(normalize_module_name(name), kind)
    assert policy.resolve("base_model.model.model.layers.2.self_attn.q_proj.base_layer", "attn_qk") == 0.6
    assert policy.resolve("model.layers.2.self_attn.q_proj", "attn_qk") == 0.6
    assert policy.resolve("model.layers.1.mlp.up_proj", "mlp") == pytest.approx(0.4, abs=1e-15)


def test_for_names_binds_only_when_needed() -> None:
    p = Policy.preset("default")
    names = [mlp_name(i) for i in range(5)]
    assert p.for_names(names).num_layers == 5
    assert p.for_names(names).resolve(mlp_name(4), "mlp") is None  # last layer dense
    assert p.for_names(["lm_head"]) is p  # nothing to infer from
    fixed = p.bind(num_layers=12)
    assert fixed.for_names(names) is fixed
    with pytest.raises(PolicyError, match="none of the given names carries a layer index"):
        p.bind(names=["lm_head"])
