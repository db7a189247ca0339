"""Per-layer compiles (FSDP2 per layer, torchtune, ``layer.compile``): ``options['layer']``.

A graph of one decoder layer names its units ``mlp.gate_proj``, with no layer index: without
``layer`` the policy's layer rules and ramps cannot apply, and the backend must say so; with it
the groups get exactly the sparsities a whole-model compile gives them.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

from sparselora_fx.backend import LAST_REPORTS
from sparselora_fx.errors import OptionsError, PolicyError
from sparselora_fx.models import build_tiny_model, tiny_batch
from sparselora_fx.passes.plan import Plan, layer_binding_note
from sparselora_fx.policy import Policy, Rule, pattern_layer_stack
from sparselora_fx.settings import Settings

DEPTH = 4
NO_INDEX_WARNING = "layer-indexed rules and ramps of the policy .* match no unit in this graph"
LOCAL_NAMES = {"gated_mlp": "mlp.gate_proj", "attn_qk": "self_attn.q_proj", "attn_vo": "self_attn.v_proj"}


def _compile_layers_in_place(model: torch.nn.Module, options_for) -> None:
    for i, layer in enumerate(model.base_model.model.model.layers):
        options = options_for(i)
        if options is not None:
            layer.compile(backend="sparselora", options={"inner": "aot_eager", "progress": False, **options})


def _layer_sparsities(reports) -> list[dict[str, float | None]]:
    """Per report (one decoder layer each): group kind -> sparsity."""
    return [{g.kind: g.sparsity for g in r.groups} for r in reports]


# ---------------------------------------------------------------------------------------------
# End to end: one tiny 4-layer Llama, each decoder layer compiled in place
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_per_layer_compile_without_layer_warns_and_stays_dense() -> None:
    model = build_tiny_model("llama", num_layers=DEPTH)
    _compile_layers_in_place(model, lambda i: {"policy": "default"} if i == 1 else None)
    LAST_REPORTS.clear()
    with pytest.warns(UserWarning, match=NO_INDEX_WARNING) as caught:
        model(**tiny_batch("llama"))
    (report,) = LAST_REPORTS
    assert [g.name for g in report.groups] == ["mlp", "self_attn", "self_attn"]  # no layer index
    assert all(g.sparsity is None for g in report.groups)
    assert sum("match no unit in this graph" in str(w.message) for w in caught) == 1  # once per backend call
    (note,) = [n for n in report.notes if "match no unit" in n]
    assert "its groups are dense by policy" in note
    assert "options={'layer': i, 'num_layers': N" in note and "options['sparsity']" in note


@pytest.mark.slow
def test_per_layer_compile_with_layer_matches_whole_model_compile() -> None:
    from sparselora_fx import explain

    model = build_tiny_model("llama", num_layers=DEPTH)
    batch = tiny_batch("llama")
    whole = explain(model, **batch, options={"policy": "default", "inner": "aot_eager", "progress": False})
    expected = [{g.kind: g.sparsity for g in whole.groups if g.name.startswith(f"model.layers.{i}.")}
                for i in range(DEPTH)]
    # the default policy: first and last layer dense, ramps in between
    assert expected[0] == expected[-1] == {"gated_mlp": None, "attn_qk": None, "attn_vo": None}
    assert 0.5 < expected[1]["gated_mlp"] < expected[2]["gated_mlp"] < 0.9
    assert 0.0 < expected[1]["attn_qk"] < expected[2]["attn_vo"] < 0.5

    _compile_layers_in_place(model, lambda i: {"policy": "default", "layer": i, "num_layers": DEPTH})
    LAST_REPORTS.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(**batch).loss.backward()
    assert not [w for w in caught if "layer index" in str(w.message)]
    assert len(LAST_REPORTS) == DEPTH  # one graph per layer, compiled in layer order
    assert _layer_sparsities(LAST_REPORTS) == expected
    assert sum(1 for r in LAST_REPORTS for g in r.groups if g.sparsity is not None) == 6  # layers 1, 2


# ---------------------------------------------------------------------------------------------
# Options: bad values are errors that say how to fix them
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-1, True, 1.0, "3", [2]])
def test_bad_layer_values(bad) -> None:
    with pytest.raises(OptionsError, match=r"options\['layer'\] must be an int >= 0, the index"):
        Settings.from_options({"policy": "dense", "layer": bad})


def test_layer_beyond_depth() -> None:
    with pytest.raises(OptionsError, match=r"options\['layer'\] = 4 is beyond num_layers = 4 .*last is 3"):
        Settings.from_options({"policy": "default", "layer": 4, "num_layers": 4})
    with pytest.raises(OptionsError, match="beyond num_layers = 2"):
        Settings.from_options({"policy": Policy(mlp=0.5, num_layers=2), "layer": 2})


def test_layer_needs_the_depth_when_the_policy_does() -> None:
    with pytest.raises(OptionsError, match=r"depth ramps or layers counted from the end.*options\['num_layers'\] = N"):
        Settings.from_options({"policy": "default", "layer": 1})
    negative = Policy(mlp=0.5, rules=(Rule(layers=(-1,), dense=True),))
    with pytest.raises(OptionsError, match="one layer cannot show the model's depth"):
        Settings.from_options({"policy": negative, "layer": 0})
    # positive layer ranges and flat values need no depth
    assert Settings.from_options({"policy": "llama3-8b-math10k", "layer": 20}).layer == 20
    assert Settings.from_options({"sparsity": 0.5, "layer": 3}).layer == 3
    assert Settings.from_options({"policy": "default", "layer": 1, "num_layers": 4}).policy.num_layers == 4


@pytest.mark.parametrize("bad", [0, -2, True, 3.0])
def test_bad_num_layers_values(bad) -> None:
    with pytest.raises(OptionsError, match=r"options\['num_layers'\] must be an int >= 1"):
        Settings.from_options({"num_layers": bad})


def test_num_layers_must_agree_with_the_policy() -> None:
    with pytest.raises(OptionsError, match=r"options\['num_layers'\] = 4 but the policy .* sets num_layers = 32"):
        Settings.from_options({"policy": Policy(mlp=0.5, num_layers=32), "num_layers": 4})
    assert Settings.from_options({"policy": Policy(mlp=0.5, num_layers=4), "num_layers": 4}).policy.num_layers == 4


# ---------------------------------------------------------------------------------------------
# The policy side: names of one layer resolve as the whole model's names do
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["default", "llama3-8b-math10k", "llama3-8b-csr", "llama3-8b-glue"])
def test_presets_resolve_local_names_like_full_names(preset: str) -> None:
    policy = Policy.preset(preset).bind(num_layers=32)
    for i in range(32):
        for kind, local in LOCAL_NAMES.items():
            full = f"model.layers.{i}.{local}"
            assert policy.resolve(local, kind, layer=i) == policy.resolve(full, kind), (preset, i, kind)
    # a name that carries its own index keeps it
    assert policy.resolve("model.layers.20.mlp.gate_proj", "mlp", layer=3) == policy.resolve(
        "model.layers.20.mlp.gate_proj", "mlp")


def test_layer_stacks_come_from_the_patterns() -> None:
    assert pattern_layer_stack("model.layers.*.mlp") == "model.layers"
    assert pattern_layer_stack("base_model.model.model.layers.3") == "model.layers"
    assert pattern_layer_stack(r"re:model\.layers\.(1[4-9]|2[0-3])\.self_attn") == "model.layers"
    assert pattern_layer_stack("transformer.h.1*") == "transformer.h"
    for no_layer in ("*.mlp", "lm_head", "re:.*mlp", "model.layers"):
        assert pattern_layer_stack(no_layer) is None, no_layer
    gpt2 = Policy(rules=(Rule(match="transformer.h.*.mlp", layers="1-2", mlp=0.5),
                         Rule(match=r"re:transformer\.h\.3\.attn", attn_qk=0.25)))
    assert gpt2.layer_stacks == ("transformer.h",)
    assert [gpt2.resolve("mlp.c_fc", "mlp", layer=i) for i in range(4)] == [None, 0.5, 0.5, None]
    assert [gpt2.resolve("attn.c_attn", "attn_qk", layer=i) for i in range(4)] == [None, None, None, 0.25]
    # no pattern names a stack: `layers` selectors and ramps still see the layer
    plain = Policy(mlp=0.5, rules=(Rule(layers=(0,), dense=True),))
    assert plain.layer_stacks == ()
    assert [plain.resolve("mlp.gate_proj", "mlp", layer=i) for i in range(3)] == [None, 0.5, 0.5]


def test_layer_indexed_and_needs_depth() -> None:
    assert Policy.preset("default").layer_indexed and Policy.preset("default").needs_depth
    assert Policy.preset("llama3-8b-math10k").layer_indexed and not Policy.preset("llama3-8b-math10k").needs_depth
    assert not Policy(mlp=0.5).layer_indexed and not Policy.preset("dense").layer_indexed
    assert Policy(mlp=0.5, rules=(Rule(match="model.layers.0", dense=True),)).layer_indexed


def test_resolve_checks_the_layer() -> None:
    policy = Policy.preset("default").bind(num_layers=4)
    with pytest.raises(PolicyError, match="layer 4 is beyond num_layers = 4"):
        policy.resolve("mlp.gate_proj", "mlp", layer=4)
    with pytest.raises(PolicyError, match="must be an int >= 0"):
        policy.resolve("mlp.gate_proj", "mlp", layer=-1)


def _groups(*names: str) -> list:
    return [SimpleNamespace(units=[SimpleNamespace(fqn=n)]) for n in names]


def test_binding_note_cases() -> None:
    default = Policy.preset("default")
    local, full = _groups("mlp.gate_proj", "self_attn.q_proj"), _groups("model.layers.1.mlp.gate_proj")
    note = layer_binding_note(local, Policy(mlp=0.5, rules=(Rule(layers=(0,), dense=True),)), None,
                              Plan([], []))
    assert note is not None and "take the policy's defaults (0 of 2 dense)" in note
    assert layer_binding_note(local, default, 1, Plan([], [])) is None  # bound: nothing to say
    assert layer_binding_note(full, default, None, Plan([], [])) is None  # whole model: indices present
    assert layer_binding_note(local, Policy(mlp=0.5), None, Plan([], [])) is None  # flat: nothing lost
    misuse = layer_binding_note(full, default, 2, Plan([], []))
    assert misuse is not None and "carry their own (e.g. `model.layers.1.mlp.gate_proj`)" in misuse


def test_explain_checks_a_single_layer_under_its_full_names() -> None:
    """explain() of one decoder layer with options['layer']: the preset's layer patterns match its
    units (no "matches no module" note), and the groups take that layer's sparsities."""
    from sparselora_fx.explain import explain

    model = build_tiny_model("llama", num_layers=DEPTH)
    inner = model.base_model.model.model
    hidden = inner.embed_tokens(tiny_batch("llama")["input_ids"])
    pos = torch.arange(hidden.shape[1])[None]
    cos_sin = inner.rotary_emb(hidden, pos)
    options = {"policy": "llama3-8b-math10k", "layer": 20, "num_layers": 32, "progress": False}
    report = explain(inner.layers[1], hidden, position_ids=pos, position_embeddings=cos_sin, options=options)
    assert not [n for n in report.notes if "matches no module" in n], report.notes
    whole = Policy.preset("llama3-8b-math10k")
    want = {kind: whole.resolve(f"model.layers.20.{name}", kind) for kind, name in LOCAL_NAMES.items()}
    assert {g.kind: g.sparsity for g in report.groups} == want
