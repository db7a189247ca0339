"""Estimator factors reach a compiled sparse step as graph inputs (``sparselora_fx/bound_factors.py``,
``passes/factors.py``): no factor lookup, fingerprint or host sync per step; kept sets and gradients
equal to the run-time-lookup path; weight changes after compiling refill them in place."""

from __future__ import annotations

import copy

import pytest
import torch

import sparselora_fx
from sparselora_fx import _compat, bound_factors
from sparselora_fx import factor_cache as fc
from sparselora_fx.backend import analyse_and_rewrite
from sparselora_fx.counters import counters, record_selections
from sparselora_fx.integrations.transformers import enable_activation_checkpointing
from sparselora_fx.models import build_tiny_model, tiny_batch
from sparselora_fx.passes import factors as graph_factors
from sparselora_fx.policy import Policy
from sparselora_fx.settings import Settings

# Every group SVD-estimated, so select_mlp, select_vo and select_qk all take factors.
OPTIONS = {"policy": Policy(mlp=0.5, attn_qk=0.5, attn_vo=0.5, estimator={"kind": "svd", "rank": 4}),
           "inner": "aot_eager", "progress": False}
HOST_SYNC = {"aten._local_scalar_dense", "aten.nonzero", "aten.item", "aten.masked_select", "aten._assert_async"}


@pytest.fixture(autouse=True)
def _fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSELORA_CACHE_DIR", str(tmp_path / "factors"))
    torch._dynamo.reset()
    fc.clear_cache()
    counters.clear()
    yield
    torch._dynamo.reset()
    fc.clear_cache()


def _capturing_backend(graphs: dict[str, list[torch.fx.GraphModule]]):
    """The sparselora backend lowered through AOTAutograd with compilers that keep the fw/bw graphs."""
    settings = Settings.from_options(OPTIONS)

    def keep(kind):
        def compiler(gm, example_inputs):
            graphs.setdefault(kind, []).append(gm)
            return _compat.boxed(gm.forward)
        return compiler

    def backend(gm, example_inputs, **_):
        _, rewritten = analyse_and_rewrite(gm, example_inputs, settings)
        compiled = _compat.aot_autograd_backend(keep("fw"), keep("bw"))(rewritten, example_inputs)
        return bound_factors.guard(compiled, rewritten)

    return backend


def _step(fn, batch, model):
    torch.manual_seed(0)
    with record_selections() as rec:
        out = fn(**batch)
        out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.loss.detach(), grads, list(rec.picks)


def _select_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and "sparselora.select_" in str(n.target)]


def _factor_inputs(node: torch.fx.Node) -> list[object]:
    """The select op's factor arguments (p1, q1, ... / p_v, q_v / p_q, ...), by schema name."""
    schema = node.target._schema
    names = [a.name for a in schema.arguments]
    values = dict(zip(names, node.args)) | dict(node.kwargs)
    return [values.get(a) for a in names if a[:2] in ("p1", "q1", "p2", "q2") or a in ("p_v", "q_v", "p_q", "q_q", "p_k", "q_k")]


def _check_graphs(graphs) -> None:
    fw, bw = graphs["fw"], graphs["bw"]
    assert fw and bw
    selects = [n for gm in fw for n in _select_nodes(gm)]
    assert {n.target._schema.name.split("::")[1] for n in selects} == {"select_mlp", "select_vo", "select_qk"}, selects
    for node in selects:
        factors = [f for f in _factor_inputs(node) if f is not None]
        assert factors and len(factors) % 2 == 0, (node, node.args, node.kwargs)
        for f in factors:  # graph inputs, never constants baked into the graph
            assert isinstance(f, torch.fx.Node) and f.op == "placeholder", (node.name, f)
    for gm in fw + bw:
        # no factor baked in as a _tensor_constant (the model's code leaves two empty ones)
        consts = [getattr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"]
        assert all(isinstance(t, torch.Tensor) and t.numel() == 0 for t in consts), consts
        calls = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
        assert not [c for c in calls if ".".join(c.split(".")[:2]) in HOST_SYNC], calls
        for n in gm.graph.nodes:  # nothing moves to another device (no copy back to the host)
            dev = n.kwargs.get("device") if n.op == "call_function" else None
            assert dev is None or torch.device(dev).type == "cpu"


def test_a_compiled_sparse_step_reads_the_factors_as_graph_inputs_and_looks_nothing_up():
    model = build_tiny_model("llama", num_layers=2, dtype=torch.float64, init_lora_b=True)
    reference = copy.deepcopy(model)
    batch = tiny_batch("llama")
    graphs: dict[str, list] = {}
    fn = torch.compile(model, backend=_capturing_backend(graphs))
    first = _step(fn, batch, model)
    assert counters["sparselora"]["factors_bound"] == 2 * 2 + 2 * 1 + 2 * 2  # per layer: gate, up; v; q, k
    _check_graphs(graphs)
    counters.clear()
    second = _step(fn, batch, model)
    c = counters["sparselora"]
    assert c["factor_lookups"] == 0 and c["fingerprints_computed"] == 0 and c["factor_cache_hits"] == 0, dict(c)
    assert c["factor_refills"] == 0
    assert torch.equal(first[0], second[0])

    # The run-time-lookup path (what weights without values at compile time take) selects and
    # trains the same: same kept sets, same loss and gradients.
    torch._dynamo.reset()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(graph_factors.GraphFactors, "_binding", lambda self, unit, rank: None)
        counters.clear()
        looked_up = _step(torch.compile(reference, backend="sparselora", options=OPTIONS), batch, reference)
        assert counters["sparselora"]["factor_lookups"] > 0 and counters["sparselora"]["factors_bound"] == 0
    assert len(first[2]) == len(looked_up[2]) == 6
    for (op_a, a), (op_b, b) in zip(first[2], looked_up[2]):
        assert op_a == op_b
        for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            assert torch.equal(x, y), op_a
    torch.testing.assert_close(first[0], looked_up[0], rtol=0, atol=0)
    assert first[1].keys() == looked_up[1].keys() and first[1]
    for name in first[1]:
        torch.testing.assert_close(first[1][name], looked_up[1][name], rtol=0, atol=0, msg=name)


@pytest.fixture
def dynamo_checkpoint_switch():
    """Restores the Dynamo switch ``enable_activation_checkpointing`` sets (as tests/test_integrations.py)."""
    before = torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint
    yield
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = before


def test_checkpoint_bodies_get_the_factors_as_operands(monkeypatch, dynamo_checkpoint_switch):
    """Activation checkpointing: the units sit in a ``wrap_body_*`` sub-graph; its factors come in
    as operands of the checkpoint op (placeholders of the body), not as tensors the body holds."""
    model = build_tiny_model("llama", num_layers=1, dtype=torch.float64, init_lora_b=True)
    enable_activation_checkpointing(model)
    batch = tiny_batch("llama")
    graphs: dict[str, list] = {}
    bodies: list[torch.fx.GraphModule] = []
    real = analyse_and_rewrite

    def spy(gm, example_inputs, settings, **kw):
        report, out = real(gm, example_inputs, settings, **kw)
        bodies.extend(s for _, s in out.named_children() if isinstance(s, torch.fx.GraphModule))
        return report, out

    monkeypatch.setattr(f"{__name__}.analyse_and_rewrite", spy)
    fn = torch.compile(model, backend=_capturing_backend(graphs))
    _step(fn, batch, model)
    assert bodies and counters["sparselora"]["factors_bound"] == 5
    for body in bodies:
        assert not [n for n in body.graph.nodes if n.op == "get_attr"]
        selects = _select_nodes(body)
        assert selects
        for node in selects:
            assert all(isinstance(f, torch.fx.Node) and f.op == "placeholder" for f in _factor_inputs(node))
    _check_graphs(graphs)
    counters.clear()
    _step(fn, batch, model)
    assert counters["sparselora"]["factor_lookups"] == 0 and counters["sparselora"]["fingerprints_computed"] == 0


def _frozen(model):
    return {n: p for n, p in model.named_parameters() if "base_layer" in n and p.dim() == 2}


def test_load_state_dict_after_compiling_refills_the_graphs_factors_in_place():
    """``load_state_dict`` bumps ``_version``: the compiled callable refills the factors before its
    next call (no recompile), and the step equals a fresh compile of the new weights."""
    options = OPTIONS
    batch = tiny_batch("llama")
    model = build_tiny_model("llama", num_layers=2, dtype=torch.float64, init_lora_b=True)
    fn = torch.compile(model, backend="sparselora", options=options)
    _step(fn, batch, model)
    rewritten = counters["sparselora"]["groups_rewritten"]
    g = torch.Generator().manual_seed(7)
    new = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) * p.std() for n, p in _frozen(model).items()}
    model.load_state_dict(new, strict=False)
    counters.clear()
    fresh = _step(fn, batch, model)
    assert counters["sparselora"]["factor_refills"] == 10
    assert counters["sparselora"]["groups_rewritten"] == 0  # no recompile
    counters.clear()
    _step(fn, batch, model)  # refilled once: the next step looks nothing up again
    assert counters["sparselora"]["factor_lookups"] == 0 and counters["sparselora"]["factor_refills"] == 0
    reference = copy.deepcopy(model)
    torch._dynamo.reset()
    fc.clear_cache()
    want = _step(torch.compile(reference, backend="sparselora", options=options), batch, reference)
    torch.testing.assert_close(fresh[0], want[0], rtol=0, atol=0)
    assert rewritten > 0


def test_refresh_factors_marks_the_bound_factors_stale_and_the_next_call_refills_them():
    model = build_tiny_model("llama", num_layers=1, dtype=torch.float64, init_lora_b=True)
    batch = tiny_batch("llama")
    fn = torch.compile(model, backend="sparselora", options=OPTIONS)
    _step(fn, batch, model)
    frozen = _frozen(model)
    gate = next(p for n, p in frozen.items() if "gate_proj" in n)
    binding = next(b for b in bound_factors._BINDINGS.values() if b.param() is gate)
    before = binding.p.clone()
    gate.data.copy_(torch.randn_like(gate) * gate.std())  # invisible to _version
    counters.clear()
    _step(fn, batch, model)
    assert counters["sparselora"]["factor_refills"] == 0  # the documented limit: needs refresh_factors
    sparselora_fx.refresh_factors(model)
    assert binding.version is None
    counters.clear()
    _step(fn, batch, model)
    assert counters["sparselora"]["factor_refills"] == 5  # every weight of the model: stale, hashed again
    assert counters["sparselora"]["factor_cache_builds"] == 1  # only the changed one gets an SVD
    assert not torch.equal(binding.p, before)
    p, q = fc.compute_factors(gate.detach(), 4)
    assert torch.equal(binding.p, p) and torch.equal(binding.q, q)


@pytest.mark.inductor
@pytest.mark.slow
def test_under_inductor_the_step_reads_the_graphs_factors_and_matches_aot_eager():
    """One cold Inductor compile: the buffers reach Inductor's graph as inputs; from the second
    step on nothing is looked up, and the loss is aot_eager's."""
    batch = tiny_batch("llama")
    model = build_tiny_model("llama", num_layers=2, dtype=torch.float64, init_lora_b=True)
    reference = copy.deepcopy(model)
    fn = torch.compile(model, backend="sparselora", options={**OPTIONS, "inner": "inductor"})
    first = _step(fn, batch, model)
    assert counters["sparselora"]["factors_bound"] == 10
    counters.clear()
    second = _step(fn, batch, model)
    c = counters["sparselora"]
    assert c["factor_lookups"] == 0 and c["fingerprints_computed"] == 0 and c["factor_cache_hits"] == 0, dict(c)
    want = _step(torch.compile(reference, backend="sparselora", options=OPTIONS), batch, reference)
    for (op_a, a), (op_b, b) in zip(second[2], want[2]):
        assert op_a == op_b
        for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            assert torch.equal(x, y), op_a
    torch.testing.assert_close(first[0], want[0], rtol=1e-10, atol=1e-12)


def test_a_graph_compiled_without_weight_values_looks_the_factors_up_at_run_time():
    """DDPOptimizer compiles each piece with fake inputs (DDP's own test, tests/test_ddp.py, runs
    the whole thing): no values, so no factors in the graph; its select ops look them up per step,
    through the fingerprint memo, and choose what the bound path chooses."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    settings = Settings.from_options(OPTIONS)

    def backend(gm, example_inputs, **_):  # as DDPOptimizer does: the passes see fakes
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        fakes = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in example_inputs]
        _, rewritten = analyse_and_rewrite(gm, fakes, settings)
        assert not bound_factors.bindings_of(rewritten)
        return bound_factors.guard(_compat.lookup_backend("aot_eager")(rewritten, example_inputs), rewritten)

    model = build_tiny_model("llama", num_layers=1, dtype=torch.float64, init_lora_b=True)
    reference = copy.deepcopy(model)
    batch = tiny_batch("llama")
    fn = torch.compile(model, backend=backend)
    _step(fn, batch, model)
    assert counters["sparselora"]["factors_bound"] == 0 and counters["sparselora"]["groups_rewritten"] == 3
    counters.clear()
    looked_up = _step(fn, batch, model)
    assert counters["sparselora"]["factor_lookups"] == 5  # gate, up, v, q, k: every step
    torch._dynamo.reset()
    bound = _step(torch.compile(reference, backend="sparselora", options=OPTIONS), batch, reference)
    assert [op for op, _ in looked_up[2]] == [op for op, _ in bound[2]]
    for (_, a), (_, b) in zip(looked_up[2], bound[2]):
        for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            assert torch.equal(x, y)
    torch.testing.assert_close(looked_up[0], bound[0], rtol=0, atol=0)
