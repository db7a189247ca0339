"""Step sensitivity: dense warm-up then sparse, counted in optimizer steps, with no recompile."""

from __future__ import annotations

import io
import warnings

import pytest
import torch

from sparselora_fx import OptionsError, Policy, PolicyError
from sparselora_fx.backend import copy_graph_module, sparselora_backend
from sparselora_fx.models import build_tiny_model, tiny_batch
from sparselora_fx.runtime.schedule import ScheduledGraph, StepSchedule
from sparselora_fx.settings import Settings, schedule_for


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a small shared CPU, tiny ops with two threads wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- StepSchedule ------------------------------------------------------------------------------


def _sgd() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)


def test_phase_follows_completed_optimizer_steps():
    s = StepSchedule(3)
    phases = []
    for _ in range(5):
        phases.append(s.phase)
        s.step()
    assert phases == ["dense"] * 3 + ["sparse"] * 2
    assert s.steps == 5 and s.sparse
    assert StepSchedule(0).sparse


def test_attach_counts_optimizer_steps_and_detaches():
    s, opt = StepSchedule(2), _sgd()
    handle = s.attach(opt)
    opt.step()
    opt.step()
    assert s.steps == 2 and s.phase == "sparse"
    with pytest.raises(OptionsError, match="attached already"):
        s.attach(opt)
    handle.remove()
    opt.step()
    assert s.steps == 2
    with pytest.raises(OptionsError, match="torch.optim.Optimizer"):
        s.attach(object())  # type: ignore[arg-type]


def test_a_removed_handle_detaches_so_the_schedule_can_attach_again():
    s, opt = StepSchedule(2), _sgd()
    s.attach(opt).remove()
    handle = s.attach(opt)  # refused as "attached already" before the handle really detached
    opt.step()
    assert s.steps == 1
    handle.remove()
    handle.remove()  # idempotent
    opt.step()
    assert s.steps == 1


def test_a_second_optimizer_is_refused_instead_of_counting_each_step_twice():
    s, first, second = StepSchedule(4), _sgd(), _sgd()
    s.attach(first)
    with pytest.raises(OptionsError, match="attached to another optimizer already.*count twice"):
        s.attach(second)
    first.step()
    second.step()
    assert s.steps == 1  # one training step, counted once: the warm-up keeps its length


def test_warmup_longer_than_the_run_warns():
    with pytest.warns(UserWarning, match="warmup_steps=50 is more than total_steps=20: the whole run stays dense"):
        StepSchedule(50, total_steps=20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        StepSchedule(20, total_steps=20)


def test_state_dict_round_trip_is_weights_only_safe():
    s = StepSchedule(4, total_steps=40)
    s.step(3)
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    buf.seek(0)
    t = StepSchedule(0)
    t.load_state_dict(torch.load(buf, weights_only=True))
    assert (t.steps, t.warmup_steps, t.total_steps, t.phase) == (3, 4, 40, "dense")
    with pytest.raises(OptionsError, match="missing"):
        t.load_state_dict({"steps": 1})
    with pytest.raises(OptionsError, match="int >= 0"):
        t.load_state_dict({"steps": -1, "warmup_steps": 0, "total_steps": None})


def test_bad_counts_are_rejected():
    with pytest.raises(OptionsError, match="warmup_steps"):
        StepSchedule(-1)
    with pytest.raises(OptionsError, match="warmup_steps"):
        StepSchedule(True)  # type: ignore[arg-type]
    with pytest.raises(OptionsError, match="n must be"):
        StepSchedule(1).step(0)


def test_from_policy_steps_and_fraction():
    assert StepSchedule.from_policy(Policy(mlp=0.5, warmup_steps=7)).warmup_steps == 7
    frac = Policy(mlp=0.5, warmup_fraction=0.05)
    assert StepSchedule.from_policy(frac, total_steps=1000).warmup_steps == 50
    assert StepSchedule.from_policy(Policy(mlp=0.5, warmup_fraction=0.05, total_steps=60)).warmup_steps == 3
    with pytest.raises(PolicyError, match="total"):
        StepSchedule.from_policy(frac)


# ---- schedule_for: how a compile finds its schedule ------------------------------------------


def test_schedule_for_decisions():
    no_warmup = Policy(mlp=0.5)
    assert schedule_for(no_warmup, None) is None
    s = StepSchedule(5)
    assert schedule_for(no_warmup, s) is s  # a schedule adds a warm-up to a policy without one
    assert schedule_for(Policy(mlp=0.5, warmup_steps=5), s) is s
    # a fraction with no total anywhere: the schedule's warm-up governs
    assert schedule_for(Policy(mlp=0.5, warmup_fraction=0.05), s) is s


def test_warmup_policy_without_schedule_says_how_to_attach_one():
    with pytest.raises(OptionsError) as info:
        schedule_for(Policy(mlp=0.5, warmup_steps=5), None)
    msg = str(info.value)
    assert "5 dense warm-up steps" in msg and "schedule.attach(optimizer)" in msg and "'schedule'" in msg
    with pytest.raises(OptionsError, match="warmup_fraction"):
        schedule_for(Policy(mlp=0.5, warmup_fraction=0.05), None)


def test_schedule_contradicting_policy_and_wrong_type():
    with pytest.raises(OptionsError, match="warmup_steps=3"):
        schedule_for(Policy(mlp=0.5, warmup_steps=5), StepSchedule(3))
    with pytest.raises(OptionsError, match="from_policy"):
        schedule_for(Policy(mlp=0.5, warmup_fraction=0.1), StepSchedule(3, total_steps=100))
    with pytest.raises(OptionsError, match="StepSchedule"):
        schedule_for(Policy(mlp=0.5), 5)


def test_settings_take_the_schedule_option():
    s = StepSchedule(2)
    assert Settings.from_options({"schedule": s}).schedule is s
    assert Settings.from_options(None).schedule is None


# ---- ScheduledGraph: lazy variants, per-call choice ------------------------------------------


def _builders(log: list[str]):
    def dense(inputs):
        log.append("dense")
        return lambda x: x + 1

    def sparse(inputs):
        log.append("sparse")
        return lambda x: x - 1

    return dense, sparse


def test_scheduled_graph_builds_each_variant_once_on_first_need():
    log: list[str] = []
    s = StepSchedule(2)
    g = ScheduledGraph(s, *_builders(log), [torch.zeros(2)])
    assert log == ["dense"] and g.built == ("dense",)
    x = torch.zeros(2)
    outs = []
    for _ in range(4):
        outs.append(g(x)[0].item())
        outs.append(g(x)[0].item())  # a second micro-batch of the same step
        s.step()
    assert outs == [1.0] * 4 + [-1.0] * 4
    assert log == ["dense", "sparse"]
    assert g.calls == {"dense": 4, "sparse": 4}


def test_scheduled_graph_builds_both_up_front_for_symbolic_inputs():
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    sym = ShapeEnv().create_unbacked_symint()
    log: list[str] = []
    ScheduledGraph(StepSchedule(0), *_builders(log), [sym])
    assert sorted(log) == ["dense", "sparse"]


# ---- copy_graph_module ---------------------------------------------------------------------


def test_copy_graph_module_shares_weights_keeps_node_attrs_and_isolates_the_graph():
    lin = torch.nn.Linear(3, 3).double()
    gm = torch.fx.symbolic_trace(lin)
    ph = next(n for n in gm.graph.nodes if n.op == "placeholder")
    ph._dynamo_source = "L['x']"
    cp = copy_graph_module(gm)
    assert cp.weight is gm.weight
    assert next(n for n in cp.graph.nodes if n.op == "placeholder")._dynamo_source == "L['x']"
    # mutate the copy: the original must not change
    out = next(n for n in cp.graph.nodes if n.op == "output")
    with cp.graph.inserting_before(out):
        neg = cp.graph.call_function(torch.neg, (out.args[0],))
    out.args = (neg,)
    cp.recompile()
    x = torch.randn(2, 3, dtype=torch.float64)
    ref = torch.nn.functional.linear(x, lin.weight, lin.bias)
    torch.testing.assert_close(gm(x), ref, rtol=0, atol=0)
    torch.testing.assert_close(cp(x), -ref, rtol=0, atol=0)


def test_backend_under_no_grad_skips_the_schedule():
    gm = torch.fx.symbolic_trace(torch.nn.Linear(3, 3).double())
    opts = {"policy": Policy(mlp=0.5, warmup_steps=2), "schedule": StepSchedule(2), "inner": "eager"}
    with torch.no_grad():
        fn = sparselora_backend(gm, [torch.randn(2, 3, dtype=torch.float64)], options=opts)
    assert not isinstance(fn, ScheduledGraph)


# ---- end to end: tiny llama, warm-up 5 of 20 optimizer steps, 2 micro-batches each -----------

WARMUP, STEPS, MICRO = 5, 20, 2


def _setup():
    model = build_tiny_model("llama", num_layers=1, dtype=torch.float64, init_lora_b=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, opt


def _compiled(model, schedule, backend_calls):
    opts = {"policy": Policy(mlp=0.5, attn_qk=0.5, attn_vo=0.5, warmup_steps=WARMUP), "schedule": schedule,
            "inner": "aot_eager", "progress": False}

    def counting(gm, example_inputs, **kw):
        fn = sparselora_backend(gm, example_inputs, options=opts)
        backend_calls.append(fn)
        return fn

    return torch.compile(model, backend=counting)


def _train(fn, opt, first: int, last: int, schedule=None) -> tuple[list[float], list[str]]:
    """Optimizer steps first..last (1-based); per step the summed micro-batch losses and the phase."""
    losses, phases = [], []
    for step in range(first, last + 1):
        phases.append(schedule.phase if schedule is not None else "dense")
        total = 0.0
        for mb in range(MICRO):
            loss = fn(**tiny_batch("llama", batch=2, seq=8, seed=100 * step + mb)).loss / MICRO
            loss.backward()
            total += loss.item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return losses, phases


def _snapshot(*state_dicts) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(list(state_dicts), buf)
    buf.seek(0)
    return buf


def test_warmup_then_sparse_without_recompile_and_resume():
    # dense reference: the same model in plain eager float64
    ref_model, ref_opt = _setup()
    dense, _ = _train(ref_model, ref_opt, 1, STEPS)

    # scheduled run, with a checkpoint after step 3
    model, opt = _setup()
    schedule = StepSchedule(WARMUP)
    schedule.attach(opt)
    calls: list = []
    fn = _compiled(model, schedule, calls)
    head, phases_head = _train(fn, opt, 1, 3, schedule)
    ckpt = _snapshot(model.state_dict(), opt.state_dict(), schedule.state_dict())
    tail, phases_tail = _train(fn, opt, 4, STEPS, schedule)
    run, phases = head + tail, phases_head + phases_tail

    assert len(calls) <= 2, f"the backend ran {len(calls)} times: the warm-up boundary recompiled"
    graphs = [g for g in calls if isinstance(g, ScheduledGraph)]
    assert graphs and all(set(g.built) == {"dense", "sparse"} for g in graphs)
    assert phases == ["dense"] * WARMUP + ["sparse"] * (STEPS - WARMUP)
    assert graphs[0].calls == {"dense": WARMUP * MICRO, "sparse": (STEPS - WARMUP) * MICRO}
    torch.testing.assert_close(run[:WARMUP], dense[:WARMUP], rtol=1e-12, atol=1e-12)
    for step in range(WARMUP, STEPS):
        assert abs(run[step] - dense[step]) > 1e-6, f"step {step + 1} ran dense after the warm-up"

    # resume into a fresh model, optimizer and schedule; steps 4..20 must match the uninterrupted run
    model2, opt2 = _setup()
    model_sd, opt_sd, sched_sd = torch.load(ckpt, weights_only=True)
    model2.load_state_dict(model_sd)
    opt2.load_state_dict(opt_sd)
    schedule2 = StepSchedule(0)
    schedule2.load_state_dict(sched_sd)
    schedule2.attach(opt2)
    assert (schedule2.steps, schedule2.phase) == (3, "dense")
    resumed, resumed_phases = _train(_compiled(model2, schedule2, []), opt2, 4, STEPS, schedule2)
    assert resumed_phases == phases[3:]
    torch.testing.assert_close(resumed, run[3:], rtol=1e-12, atol=1e-12)
    for (name, p), p2 in zip(model.named_parameters(), model2.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p2, p, rtol=1e-12, atol=1e-12, msg=name)


def test_dynamic_shapes_build_both_variants_up_front_and_serve_new_sizes():
    schedule = StepSchedule(1)
    graphs: list = []
    opts = {"policy": Policy(mlp=0.5), "schedule": schedule, "inner": "aot_eager", "progress": False}

    def counting(gm, example_inputs, **kw):
        graphs.append(sparselora_backend(gm, example_inputs, options=opts))
        return graphs[-1]

    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    fn = torch.compile(lambda x: torch.tanh(x @ w).sum(0), backend=counting, dynamic=True)
    for rows in (6, 9, 11):  # sizes unlike w's, so duck sizing shares no symbol
        x = torch.randn(rows, 4, dtype=torch.float64)
        torch.testing.assert_close(fn(x), torch.tanh(x @ w).sum(0), rtol=1e-12, atol=1e-12)
        assert len(graphs) == 1 and set(graphs[0].built) == {"dense", "sparse"}
        schedule.step()
    assert graphs[0].calls == {"dense": 1, "sparse": 2}
