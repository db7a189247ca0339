"""The ``sparselora`` torch.compile backend: run the passes on the Dynamo graph, then lower it.

The rewrite happens at torch level, before autograd, so AOTAutograd derives the backward of our
ops and Inductor keeps its whole pipeline. Registration: the ``torch_dynamo_backends`` entry point
(pyproject) makes the name known without importing us; importing registers it only when no
entry point or earlier registration has it (Dynamo asserts on a duplicate name).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Callable

import torch
from torch.fx import GraphModule

from . import _compat
from .dump import Dumper
from .errors import OptionsError, PolicyError
from .passes.groups import Skipped
from .passes import PassContext, run_pipeline
from .report import Report, build_report
from .runtime import lowering
from .runtime.schedule import ScheduledGraph, StepSchedule, copy_graph_module, schedule_for
from .settings import Settings

log = logging.getLogger("sparselora_fx")

BACKEND_NAME = "sparselora"

#: Reports of the graphs compiled most recently (newest last), for ``explain`` and debugging.
LAST_REPORTS: list[Report] = []
_MAX_REPORTS = 64


def sparselora_backend(gm: GraphModule, example_inputs: list[Any], options: dict[str, Any] | None = None,
                       mode: str | None = None, **unused: Any) -> Callable[..., Any]:
    """Dynamo backend: find LoRA units, group, plan, rewrite, then hand over to the inner compiler."""
    settings = Settings.from_options(options)
    schedule = schedule_for(settings.policy, settings.schedule)
    if schedule is not None and (torch.is_grad_enabled() or settings.sparse_eval):
        return lower_scheduled(gm, example_inputs, settings, mode, schedule)
    _, gm = analyse_and_rewrite(gm, example_inputs, settings)
    return lower(gm, example_inputs, settings, mode)


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
    original ``gm`` is returned untouched. Bad user input (options, policy) is raised, not hidden.
    """
    sparse = rewrite and (torch.is_grad_enabled() or settings.sparse_eval)
    work = copy_graph_module(gm) if sparse else gm
    ctx = PassContext(work, list(example_inputs), settings, sparse_enabled=sparse)
    dumper = Dumper(settings.dump_dir)
    result = work
    try:
        run_pipeline(ctx, on_pass=dumper)
    except (OptionsError, PolicyError):
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
    """Hand the (rewritten) graph to the inner compiler the settings name."""
    if settings.inner == "eager":
        return gm.forward
    if settings.inner == "aot_eager":
        return _compat.lookup_backend("aot_eager")(gm, example_inputs)
    patches = dict(settings.inductor)
    if mode is not None and mode != "default":
        patches = {**_compat.inductor_mode_options(mode), **patches}
    if lowering.holds_ops(gm):
        # The Triton swap happens while AOTAutograd traces; a cache hit skips the trace, so the
        # switches it reads must be part of the cache key (runtime/lowering.py).
        patches = _compat.keyed_inductor_patches(patches, lowering.cache_salt())
    return _compat.compile_fx()(gm, example_inputs, config_patches=patches or None)


def register() -> None:
    """Make ``backend="sparselora"`` resolvable when we are imported without being installed."""
    try:
        entry_points, compiler_fns = _compat.backend_registry()
    except Exception:  # pragma: no cover - registry moved: the entry point still works
        return
    if BACKEND_NAME in compiler_fns or entry_points.get(BACKEND_NAME) is not None:
        return  # registered already, or lookup_backend will load the entry point and register it
    _compat.register_backend(sparselora_backend, BACKEND_NAME)
