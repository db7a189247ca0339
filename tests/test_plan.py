"""The plan pass's policy checks: rules that select nothing are reported, soundly, once per graph.

A typo in a rule (`model.layer.*.mlp`, `layers = "50-60"` on a 2-layer model) used to train
dense with no word said. The backend now warns (a PolicyWarning; SPARSELORA_STRICT=1: an
UnmatchedRuleError) when the graph proves the rule can match nothing anywhere in the model, and
stays quiet where another graph (a DDP piece, the other side of a graph break, another layer of
a per-layer compile) could hold what the rule names.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

from sparselora_fx.backend import LAST_REPORTS
from sparselora_fx.models import build_tiny_model, tiny_batch
from sparselora_fx.passes.plan import _node_module_path, graph_names
from sparselora_fx.policy import Policy, PolicyWarning, UnmatchedRuleError
from sparselora_fx.policy.checking import GraphNames, unmatched_rules

from tests.conftest import trace_graphs

OPTIONS = {"inner": "aot_eager", "progress": False}

# (policy, what the warning must name: the rule, its text, a nearest name or the depth)
TYPOS = {
    "stack typo": (
        {"defaults": {"attn": 0.5}, "rules": [{"match": "model.layer.*.mlp", "mlp": 0.9}]},
        ["rules[0]", 'match = "model.layer.*.mlp"', "Nearest names: model.layers.*.mlp", "e.g. 'model.layers.*.mlp'"],
    ),
    "layers beyond depth": (
        {"defaults": {"attn": 0.5}, "rules": [{"layers": "50-60", "mlp": 0.9}]},
        ["rules[0]", 'layers = "50-60"', "select no layer of this 2-layer model", "within 0..1"],
    ),
    "negative beyond depth": (
        {"defaults": {"attn": 0.5}, "rules": [{"layers": [-5], "mlp": 0.9}]},
        ["rules[0]", "layers = -5", "select no layer of this 2-layer model"],
    ),
    "mistyped dense rule": (  # the other way round: meant-dense layers would stay sparse
        {"defaults": {"mlp": 0.9}, "rules": [{"match": "model.layers.*.mpl", "dense": True}]},
        ["rules[0]", 'match = "model.layers.*.mpl", dense = true', "Nearest names: model.layers.*.mlp"],
    ),
}

GOOD = {
    "globs, regexes and layers": {
        "defaults": {"mlp": 0.5},
        "rules": [
            {"match": "model.layers.*.mlp", "layers": [-1], "dense": True},
            {"match": "re:model\\.layers\\.(0|1)\\.self_attn", "attn": 0.5},
            {"match": ["model.layers.0", "lm_head"], "attn_vo": 0.25},
            {"layers": "0-1", "attn_qk": 0.25},
        ],
    },
    "default preset": "default",
}


def _train_step(policy, num_layers: int = 2) -> None:
    torch._dynamo.reset()
    model = build_tiny_model("llama", num_layers=num_layers)
    compiled = torch.compile(model, backend="sparselora", options={**OPTIONS, "policy": policy})
    compiled(**tiny_batch("llama")).loss.backward()


def _ours(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, PolicyWarning)]


def _inner(exc: BaseException) -> BaseException:
    while not isinstance(exc, UnmatchedRuleError) and (exc.__cause__ or exc.__context__) is not None:
        exc = getattr(exc, "inner_exception", None) or exc.__cause__ or exc.__context__
    return exc


# ---------------------------------------------------------------------------------------------
# End to end: one whole-model compile of a tiny 2-layer Llama
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(TYPOS))
def test_rule_that_matches_nothing_warns_once_naming_rule_nearest_name_and_fix(case, monkeypatch) -> None:
    monkeypatch.setenv("SPARSELORA_STRICT", "0")
    policy, pieces = TYPOS[case]
    LAST_REPORTS.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train_step(policy)
    (message,) = _ours(caught)  # one graph: one warning, however many groups it has
    assert message.startswith("sparselora: policy <policy dict>: 1 rule selects no module of this model")
    for piece in pieces:
        assert piece in message, (piece, message)
    assert "Fix:" in message and "SPARSELORA_STRICT=1" in message
    assert any("rules[0]" in note for note in LAST_REPORTS[-1].notes)  # and the report says it too


@pytest.mark.parametrize("case", list(TYPOS))
def test_rule_that_matches_nothing_is_an_error_under_strict(case, monkeypatch) -> None:
    monkeypatch.setenv("SPARSELORA_STRICT", "1")
    policy, pieces = TYPOS[case]
    with pytest.raises(Exception) as info:
        _train_step(policy)
    err = _inner(info.value)
    assert isinstance(err, UnmatchedRuleError), repr(info.value)  # raised, not the dense fallback
    assert "runs dense: the passes failed" not in str(info.value)
    assert all(piece in str(err) for piece in pieces), str(err)


@pytest.mark.parametrize("case", list(GOOD))
def test_policy_whose_rules_all_match_warns_nothing(case, monkeypatch) -> None:
    monkeypatch.setenv("SPARSELORA_STRICT", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecations
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        _train_step(GOOD[case])


@pytest.mark.parametrize("source", ["dict", "file"])
def test_policy_that_sets_no_sparsity_says_everything_runs_dense(source, tmp_path) -> None:
    if source == "file":
        path = tmp_path / "empty.toml"
        path.write_text("# nothing yet\n", encoding="utf-8")
        policy = str(path)
    else:
        policy = {}
    with pytest.warns(PolicyWarning, match="sets no sparsity.*every group of this graph runs dense") as caught:
        _train_step(policy)  # a warning even under SPARSELORA_STRICT=1 (conftest): nothing is wrong with it
    assert len(_ours(caught)) == 1


def test_dense_preset_runs_dense_without_a_word() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", category=PolicyWarning)
        _train_step("dense")


# ---------------------------------------------------------------------------------------------
# Soundness: graph pieces (DDP, graph breaks) and per-layer compiles warn only what they prove
# ---------------------------------------------------------------------------------------------

PIECE_POLICY = Policy.from_dict(
    {
        "defaults": {"mlp": 0.5},
        "rules": [
            {"layers": "2-3", "mlp": 0.75},  # a piece of layers 0-1 has none of these
            {"match": "model.layers.*.self_attn", "layers": "0-1", "attn": 0.5},
            {"match": "re:model\\.layers\\.(2|3)\\.mlp", "dense": True},
            {"match": "model.layers.3", "attn_vo": 0.25},
            {"match": "lm_head", "attn_qk": 0.1},  # not a unit here, but the model has it
        ],
    },
    source="pieces.toml",
)


@pytest.fixture(scope="module")
def four_layer_graph():
    torch._dynamo.reset()
    (gm,) = trace_graphs(build_tiny_model("llama", num_layers=4), **tiny_batch("llama"))
    nodes = list(gm.graph.nodes)
    paths = [_node_module_path(n) for n in nodes]
    units = sorted({p for p in paths if p.endswith("_proj")})
    cut = next(i for i, (n, p) in enumerate(zip(nodes, paths))
               if n.op == "call_function" and p.startswith("model.layers.2"))
    pieces = {
        "whole": gm,
        "layers 0-1": SimpleNamespace(graph=SimpleNamespace(nodes=nodes[:cut])),  # what DDP's first piece sees
        "layers 2-3 + head": SimpleNamespace(graph=SimpleNamespace(nodes=nodes[cut:])),
    }
    unit_names = {
        "whole": units,
        "layers 0-1": [u for u in units if u.startswith(("model.layers.0.", "model.layers.1."))],
        "layers 2-3 + head": [u for u in units if u.startswith(("model.layers.2.", "model.layers.3."))],
    }
    return pieces, unit_names


def _found(policy, graph) -> list[int]:
    return [f.index for f in unmatched_rules(policy, graph)]


def test_graph_evidence_whole_graph_and_pieces(four_layer_graph) -> None:
    pieces, units = four_layer_graph
    scopes = {k: graph_names(pieces[k], units[k], Policy(), None) for k in pieces}
    assert scopes["whole"].depth == 4 and scopes["whole"].whole_stacks == ("model.layers",)
    assert scopes["layers 0-1"].depth is None and scopes["layers 0-1"].whole_stacks == ()  # the stack goes on
    assert scopes["layers 2-3 + head"].depth == 4 and scopes["layers 2-3 + head"].whole_stacks == ()  # ends here
    assert all(s.stacks == ("model.layers",) for s in scopes.values())
    bound = graph_names(pieces["layers 0-1"], units["layers 0-1"], Policy().bind(num_layers=4), None)
    assert bound.depth == 4  # options['num_layers'] / [defaults] num_layers: known in every piece


@pytest.mark.parametrize("piece", ["whole", "layers 0-1", "layers 2-3 + head"])
def test_rules_for_layers_in_another_piece_are_not_reported(four_layer_graph, piece) -> None:
    pieces, units = four_layer_graph
    assert _found(PIECE_POLICY, graph_names(pieces[piece], units[piece], PIECE_POLICY, None)) == []


@pytest.mark.parametrize(
    ("rule", "reported_in"),
    [
        ({"match": "model.layer.*.mlp", "mlp": 0.9}, {"whole", "layers 0-1", "layers 2-3 + head"}),
        ({"match": "modle.layers.*", "mlp": 0.9}, {"whole", "layers 0-1", "layers 2-3 + head"}),
        ({"match": "model.layers.mlp", "mlp": 0.9}, {"whole", "layers 0-1", "layers 2-3 + head"}),  # no index
        ({"match": "lm_haed", "mlp": 0.9}, {"whole", "layers 2-3 + head"}),  # a typo of a name the piece shows
        ({"match": "model.layers.*.mpl", "dense": True}, {"whole"}),  # only a whole stack shows every layer
        ({"match": "model.decoder.layers.*", "mlp": 0.9}, set()),  # not a typo: may be another graph's
        ({"match": "model.layers.7.mlp", "mlp": 0.9}, {"whole", "layers 2-3 + head"}),  # depth known
        ({"layers": "50-60", "mlp": 0.9}, {"whole", "layers 2-3 + head"}),
        ({"layers": [-5], "dense": True}, {"whole", "layers 2-3 + head"}),
        ({"match": "vision_tower.*", "mlp": 0.9}, set()),  # another subtree: could be another graph
        ({"match": "*.mpl", "mlp": 0.9}, set()),  # commits to no path: only explain() can tell
    ],
)
def test_what_each_piece_can_prove(four_layer_graph, rule, reported_in) -> None:
    pieces, units = four_layer_graph
    policy = Policy.from_dict({"defaults": {"attn": 0.5}, "rules": [rule]})
    got = {k for k in pieces if _found(policy, graph_names(pieces[k], units[k], policy, None))}
    assert got == reported_in


def test_separate_subtrees_and_head_only_graphs_stay_quiet() -> None:
    encoder = GraphNames(modules=("model.encoder.layers.0.fc1", "model.encoder.layers.1.fc1"),
                         stacks=("model.encoder.layers",))
    decoder_rules = Policy.from_dict({"rules": [{"match": "model.decoder.layers.*.fc1", "mlp": 0.5},
                                                {"match": "decoder.block.*", "mlp": 0.5}]})
    assert _found(decoder_rules, encoder) == []  # `decoder` is not a typo of `encoder`
    assert _found(Policy.from_dict({"rules": [{"match": "model.encoder.layer.*", "mlp": 0.5}]}), encoder) == [0]
    head_only = GraphNames(modules=("lm_head", "model.norm"))
    assert _found(PIECE_POLICY, head_only) == []
    assert _found(Policy.from_dict({"rules": [{"match": "model.layer.*", "mlp": 0.5}]}), head_only) == []


def test_per_layer_compile_checks_only_the_depth() -> None:
    policy = Policy.from_dict({"defaults": {"mlp": 0.5},
                               "rules": [{"layers": "0-1", "dense": True},
                                         {"match": "model.layers.*.mpl", "attn": 0.5},
                                         {"layers": 9, "attn": 0.25}]}).bind(num_layers=4)
    for layer in range(4):
        scope = graph_names(None, ["mlp.gate_proj", "self_attn.q_proj"], policy, layer)
        assert not scope.names_checkable and scope.depth == 4
        assert _found(policy, scope) == [2]  # not rules[0] (other layers), not rules[1] (unprovable here)
    unbound = graph_names(None, ["mlp.gate_proj"], Policy.from_dict({"rules": [{"layers": 9, "mlp": 0.5}]}), 3)
    assert unbound.depth is None and _found(Policy.from_dict({"rules": [{"layers": 9, "mlp": 0.5}]}), unbound) == []


@pytest.mark.slow
def test_per_layer_compiles_warn_once_each_about_the_rule_beyond_the_depth(monkeypatch) -> None:
    monkeypatch.setenv("SPARSELORA_STRICT", "0")
    model = build_tiny_model("llama", num_layers=4)
    policy = {"defaults": {"mlp": 0.5}, "rules": [{"layers": "0-1", "dense": True}, {"layers": 9, "attn": 0.5}]}
    for i, layer in enumerate(model.base_model.model.model.layers):
        layer.compile(backend="sparselora", options={**OPTIONS, "policy": policy, "layer": i, "num_layers": 4})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(**tiny_batch("llama")).loss.backward()
    ours = _ours(caught)
    assert len(ours) == 4  # one per layer graph (one backend call each), never one per group
    assert all("rules[1]" in m and "rules[0]" not in m for m in ours)


def test_plan_carries_the_policys_estimator_spec_and_the_ops_take_its_arguments_in_schema_order() -> None:
    """One estimator type from policy to op: the plan holds the policy's ``EstimatorSpec`` (with
    ``options['estimator_rank']`` applied to svd), and ``op_args`` is what every select op's schema
    names after its own arguments, in that order."""
    import torch

    from sparselora_fx.passes.analyse.groups import Group
    from sparselora_fx.passes.plan import make_plan
    from sparselora_fx.policy import EstimatorSpec, Policy
    from sparselora_fx.runtime import selection  # noqa: F401  (registers the select ops)

    spec = EstimatorSpec("token_sample", samples=32, fraction=0.03)
    assert spec.op_args() == ("token_sample", 8, 32, 0, 0.03)
    assert EstimatorSpec("svd").op_args() == ("svd", 8, 64, 0, 0.0)
    for op in ("select_mlp", "select_vo", "select_qk"):
        names = [a.name for a in getattr(torch.ops.sparselora, op).default._schema.arguments]
        start = names.index("estimator")
        assert names[start:start + 5] == ["estimator", "rank", "samples", "seed", "fraction"], op

    class _Unit:  # only what make_plan reads of a unit
        fqn = "model.layers.0.mlp.gate_proj"
        out_features = 96

    group = Group(kind="gated_mlp", units=[_Unit()], name="model.layers.0.mlp")  # type: ignore[list-item]
    policy = Policy(mlp=0.5, estimator={"mlp": spec})
    (plan,) = make_plan([group], policy, None, True).groups
    assert plan.estimator == spec
    svd = Policy(mlp=0.5, estimator={"mlp": EstimatorSpec("svd", rank=4)})
    assert make_plan([group], svd, 16, True).groups[0].estimator == EstimatorSpec("svd", rank=16)
