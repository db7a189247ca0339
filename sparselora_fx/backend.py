"""The ``sparselora`` torch.compile backend: run the passes on the Dynamo graph, then lower it.

The rewrite happens at torch level, before autograd, so AOTAutograd derives the backward of our
ops and Inductor keeps its whole pipeline. Registration: the ``torch_dynamo_backends`` entry point
(pyproject) makes the name known without importing us; importing registers it only when no
entry point or earlier registration has it (Dynamo asserts on a duplicate name).
"""

from __future__ import annotations

import copy
import logging
import warnings
from typing import Any, Callable

import torch
from torch.fx import GraphModule

from . import _compat, bound_factors
from .dump import Dumper
from .errors import OptionsError, PolicyError
from .passes.analyse.groups import Skipped
from .passes import PassContext, run_pipeline
from .report import Report, build_report
from .passes import lower as lowering
from .runtime.schedule import ScheduledGraph, StepSchedule
from .settings import Settings

log = logging.getLogger("sparselora_fx")

BACKEND_NAME = "sparselora"

#: Reports of the graphs compiled most recently (newest last), for ``explain`` and debugging.
LAST_REPORTS: list[Report] = []
_MAX_REPORTS = 64


def sparselora_backend(gm: GraphModule, example_inputs: list[Any], options: dict[str, Any] | None = None,
                       mode: str | None = None, **unused: Any) -> Callable[..., Any]:
    """Dynamo backend: find LoRA units, group, plan, rewrite, then hand over to the inner compiler."""
    settings = Settings.from_options(options, require_schedule=True)
    if settings.schedule is not None and runs_sparse(settings):
        return lower_scheduled(gm, example_inputs, settings, mode, settings.schedule)
    _, gm = analyse_and_rewrite(gm, example_inputs, settings)
    return lower(gm, example_inputs, settings, mode)


def runs_sparse(settings: Settings) -> bool:
    """Whether the graph being compiled now runs sparse: gradients on, or ``options['sparse_eval']``.

    The rule is gradients, not ``model.eval()``: a backend is not shown the module's training
    flag, and Dynamo retraces on ``model.train()``/``eval()`` only when the forward reads
    ``self.training`` (a module that never does keeps one graph for both modes), so a
    training-mode rule could not hold. Grad mode is global state that Dynamo guards on for every
    graph, so a ``torch.no_grad()`` / ``inference_mode`` call always gets its own, dense, compile.
    """
    return torch.is_grad_enabled() or settings.sparse_eval


def lower_scheduled(gm: GraphModule, example_inputs: list[Any], settings: Settings, mode: str | None,
                    schedule: StepSchedule) -> ScheduledGraph:
    """Dense and sparse variants of one graph, each compiled on first need, picked per call by ``schedule``.

    The rewrite (and Inductor's pre-grad passes) mutate their graph in place, so the sparse variant
    starts from a copy taken now, before either variant is built; the dense one lowers ``gm`` as is.
    """
    pristine = copy_graph_module(gm)

    def build_dense(inputs: list[Any]) -> Callable[..., Any]:
        return lower(gm, inputs, settings, mode)

    def build_sparse(inputs: list[Any]) -> Callable[..., Any]:
        _, sparse = analyse_and_rewrite(pristine, inputs, settings)
        return lower(sparse, inputs, settings, mode)

    return ScheduledGraph(schedule, build_dense, build_sparse, example_inputs)


def analyse_and_rewrite(gm: GraphModule, example_inputs: list[Any], settings: Settings,
                        *, rewrite: bool = True) -> tuple[Report, GraphModule]:
    """Run the pipeline on a copy of ``gm``; a graph we cannot handle stays dense with a warning.

    The passes work on a copy so that a failure half-way never ships a half-rewritten graph: the
    original ``gm`` is returned untouched. Bad user input (options, policy) and the user's
    environment (an OSError: a full disk, a dump folder removed) are raised as themselves, not hidden.
    """
    sparse = rewrite and runs_sparse(settings)
    work = copy_graph_module(gm) if sparse else gm
    ctx = PassContext(work, list(example_inputs), settings, sparse_enabled=sparse)
    dumper = Dumper(settings.dump_dir)
    result = work
    try:
        run_pipeline(ctx, on_pass=dumper)
    except (OptionsError, PolicyError, OSError):  # the user's to fix, not an unsupported graph
        raise
    except Exception as err:  # a graph shape we did not foresee: never break the user's run
        warnings.warn(f"sparselora: this graph runs dense: the passes failed with {type(err).__name__}: {err}. "
                      "Please report it with SPARSELORA_DUMP_DIR set.", stacklevel=2)
        log.exception("sparselora passes failed; graph left dense")
        raise_if_strict(err)
        result = gm
        ctx.skipped.append(Skipped("<graph>", f"passes failed ({type(err).__name__}: {err}); whole graph dense"))
        if ctx.plan is not None:
            ctx.plan.groups.clear()
    report = build_report(ctx)
    if rewrite and not sparse:
        report.notes.append("gradients are off: the graph runs dense (options['sparse_eval']=True makes it sparse)")
    dumper.write_report(report)
    _compat.trace_artifact("report", report.to_json)
    LAST_REPORTS.append(report)
    del LAST_REPORTS[:-_MAX_REPORTS]
    log.info("sparselora: %s", report.counts())
    return report, result


def raise_if_strict(err: Exception) -> None:
    """Tests set SPARSELORA_STRICT=1 so that a fallback is a failure, not a warning."""
    import os

    if os.environ.get("SPARSELORA_STRICT") == "1":
        raise err


def lower(gm: GraphModule, example_inputs: list[Any], settings: Settings, mode: str | None = None) -> Callable[..., Any]:
    """Hand the (rewritten) graph to the inner compiler the settings name.

    A graph holding estimator factors (``bound_factors``) comes back guarded: before each call the
    factors of weights changed since (``load_state_dict``, ``refresh_factors``) are refilled in place.
    """
    return bound_factors.guard(_lower(gm, example_inputs, settings, mode), gm)


def _lower(gm: GraphModule, example_inputs: list[Any], settings: Settings, mode: str | None) -> Callable[..., Any]:
    if settings.inner == "eager":
        return gm.forward
    if settings.inner == "aot_eager":
        return _compat.lookup_backend("aot_eager")(gm, example_inputs)
    patches = dict(settings.inductor)
    if mode is not None and mode != "default":
        patches = {**_compat.inductor_mode_options(mode), **patches}
    if lowering.holds_ops(gm):
        # The Triton swap happens while AOTAutograd traces; a cache hit skips the trace, so the
        # switches it reads must be part of the cache key (passes/lower.py).
        patches = _compat.keyed_inductor_patches(patches, lowering.cache_salt())
    return _compat.compile_fx()(gm, example_inputs, config_patches=patches or None)


def copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A new GraphModule over a copy of ``gm``'s graph, sharing its parameters and constants.

    Why: the rewrite mutates its graph in place, and a deep copy of the module would duplicate
    every weight held as an attribute. Node ``meta`` is copied shallowly (by ``Graph``), and the
    attributes Dynamo hangs on nodes (``_dynamo_source`` on placeholders, which the unit matcher
    reads) are carried over.
    """
    graph = copy.deepcopy(gm.graph)
    for old, new in zip(gm.graph.nodes, graph.nodes):  # the copy keeps node order and names
        if (old.op, old.name) != (new.op, new.name):
            continue
        for attr, value in vars(old).items():
            if attr not in vars(new):
                setattr(new, attr, value)
    out = torch.fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    out.meta = dict(getattr(gm, "meta", {}))
    # higher-order-op bodies (checkpoint's wrap_body_*) are rewritten too: copy them, never share
    for node in graph.nodes:
        if node.op == "get_attr":
            sub = getattr(out, node.target, None)
            if isinstance(sub, torch.fx.GraphModule):
                setattr(out, node.target, copy_graph_module(sub))
    return out


def register() -> None:
    """Make ``backend="sparselora"`` resolvable when we are imported without being installed."""
    try:
        entry_points, compiler_fns = _compat.backend_registry()
    except Exception:  # pragma: no cover - registry moved: the entry point still works
        return
    if BACKEND_NAME in compiler_fns or entry_points.get(BACKEND_NAME) is not None:
        return  # registered already, or lookup_backend will load the entry point and register it
    _compat.register_backend(sparselora_backend, BACKEND_NAME)
