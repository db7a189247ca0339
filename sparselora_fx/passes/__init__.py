"""The ordered pass pipeline: analyse -> group -> plan -> rewrite.

Each pass is a plain function over a ``PassContext``; ``PIPELINE`` lists them in order and prints
as a table (``print(describe_pipeline())``). Every match bumps a counter in ``COUNTERS`` so tests
can assert what fired, the way Inductor's fx_passes do.
"""

from __future__ import annotations

import collections
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.fx import GraphModule

from .groups import Group, Skipped, find_mlp_groups
from .plan import Plan, layer_binding_note, make_plan
from .units import LoraUnit, expand_fused, find_lora_units

log = logging.getLogger("sparselora_fx")

COUNTERS: collections.Counter[str] = collections.Counter()


@dataclass
class PassContext:
    gm: GraphModule
    example_inputs: list[Any]
    settings: Any
    sparse_enabled: bool = True
    units: list[LoraUnit] = field(default_factory=list)
    groups: list[Group] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    plan: Plan | None = None
    rewritten: int = 0
    notes: list[str] = field(default_factory=list)


def pass_find_units(ctx: PassContext) -> None:
    """Match every frozen linear + LoRA branch (recursing into HOP bodies)."""
    ctx.units = find_lora_units(ctx.gm)
    COUNTERS["units_matched"] += len(ctx.units)


def pass_group(ctx: PassContext) -> None:
    """Prove MLP and attention groups from the dataflow; record what could not be grouped."""
    from .attention import find_attention_groups
    from .units import detect_unsupported

    unsupported = detect_unsupported(ctx.gm)  # QLoRA / DoRA: never sparsified, always reported
    bad = {name for name, _ in unsupported}
    ctx.units = [u for u in ctx.units if u.fqn not in bad]
    mlp, skipped = find_mlp_groups(ctx.units)
    grouped = {id(u) for g in mlp for u in g.units}
    attn, attn_skipped = find_attention_groups([u for u in ctx.units if id(u) not in grouped])
    ctx.groups = mlp + attn
    ctx.units = expand_fused(ctx.units, ctx.groups)
    grouped = {id(u) for g in ctx.groups for u in g.units}
    # Reasons for grouped units go, and reasons for a fused projection now reported as its parts
    # (it is no longer a unit: e.g. the MLP pass's "not a down projection"); an ungrouped part's
    # own reason is named `parent[role]` by the grouping passes and stays.
    expanded = {u.part.parent.fqn for u in ctx.units if u.part is not None}
    dropped = {u.fqn for g in ctx.groups for u in g.units} | expanded
    ctx.skipped = [s for s in skipped + attn_skipped if s.name not in dropped]
    named = {s.name for s in ctx.skipped}
    for unit in ctx.units:
        if id(unit) not in grouped and unit.fqn not in named:
            ctx.skipped.append(Skipped(unit.fqn, _ungrouped_reason(unit), unit.output.name))
    ctx.skipped += [Skipped(name, reason) for name, reason in unsupported]
    for g in ctx.groups:
        COUNTERS[f"group_{g.kind}"] += 1
    COUNTERS["units_skipped"] += len(ctx.units) - len(grouped)


def _ungrouped_reason(unit: LoraUnit) -> str:
    from . import graph_ops as ops

    if unit.part is not None:
        return (f"part {unit.part.offset}:{unit.part.offset + unit.part.width} of fused projection "
                f"`{unit.part.parent.fqn}`: not part of any provable MLP or attention group; it runs dense")
    for user in unit.output.users:
        if ops.is_call(user, {torch.chunk, torch.split}, {"chunk", "split", "unbind"}):
            return "fused projection (output split into parts) whose parts could not be grouped; it runs dense"
    return "not part of any provable MLP or attention group"


def pass_plan(ctx: PassContext) -> None:
    """Turn the policy into per-group sparsity, keep counts and estimators."""
    layer = getattr(ctx.settings, "layer", None)
    ctx.plan = make_plan(ctx.groups, ctx.settings.policy, ctx.settings.estimator_rank, ctx.sparse_enabled,
                         layer=layer)
    note = layer_binding_note(ctx.groups, ctx.settings.policy, layer, ctx.plan)
    if note is not None:  # once per backend call: a per-layer graph whose policy cannot see its layer
        warnings.warn(f"sparselora: {note}", stacklevel=2)
        log.warning("sparselora: %s", note)
        ctx.notes.append(note)


def pass_prepare_estimators(ctx: PassContext) -> None:
    """Build the SVD estimators' factors now (progress bar) when the weights' values are at hand."""
    from ..runtime.factor_cache import cache_stats, prepare_factors
    from .rewrite import oriented_weight, real_weights

    if ctx.plan is None:
        return
    real = real_weights(ctx.gm, ctx.example_inputs)
    by_rank: dict[int, list[tuple[str, torch.Tensor]]] = collections.defaultdict(list)
    for gp in ctx.plan.groups:
        if gp.estimator.kind != "svd":
            continue
        for unit in gp.group.units:
            if unit.role in ("down", "fc2", "o"):
                continue  # read by channel, never estimated
            weight = real.get(unit.scope.resolve(unit.weight))
            if weight is not None:  # the tensor the select op gets: Conv1D's W.t(), a part's rows
                by_rank[gp.estimator.rank].append((unit.fqn, oriented_weight(unit, weight)))
    before = cache_stats()
    for rank, weights in by_rank.items():
        usable = prepare_factors(weights, rank, progress=ctx.settings.progress)
        COUNTERS["factors_prepared"] += sum(usable.values())
    if by_rank:
        after = cache_stats()
        ctx.notes.append(f"SVD estimator factors for {sum(len(w) for w in by_rank.values())} weights: "
                         f"built in {after.build_seconds - before.build_seconds:.2f} s "
                         f"({after.misses - before.misses} new, the rest cached), "
                         f"{after.bytes_in_memory / 2**20:.2f} MiB held in memory")


def pass_rewrite(ctx: PassContext) -> None:
    """Write the plan into the graph (estimator -> top-k -> gather ops)."""
    from .rewrite import rewrite_graph

    assert ctx.plan is not None
    if not ctx.sparse_enabled:
        return
    ctx.rewritten = rewrite_graph(ctx.gm, ctx.plan, ctx.example_inputs, ctx.skipped)
    COUNTERS["groups_rewritten"] += ctx.rewritten


@dataclass(frozen=True)
class Pass:
    name: str
    fn: Callable[[PassContext], None]
    changes_graph: bool

    @property
    def doc(self) -> str:
        return (self.fn.__doc__ or "").strip().splitlines()[0]


PIPELINE: tuple[Pass, ...] = (
    Pass("find_units", pass_find_units, False),
    Pass("group", pass_group, False),
    Pass("plan", pass_plan, False),
    Pass("prepare_estimators", pass_prepare_estimators, False),
    Pass("rewrite", pass_rewrite, True),
)


def describe_pipeline() -> str:
    from tabulate import tabulate

    return tabulate([[i, p.name, "yes" if p.changes_graph else "no", p.doc] for i, p in enumerate(PIPELINE)],
                    headers=["#", "pass", "changes graph", "what"], tablefmt="simple")


def run_pipeline(ctx: PassContext, *, until: str | None = None,
                 on_pass: Callable[[Pass, PassContext, str], None] | None = None) -> PassContext:
    """Run the passes in order (stopping after ``until``), calling ``on_pass`` before and after each."""
    for p in PIPELINE:
        if on_pass is not None:
            on_pass(p, ctx, "before")
        p.fn(ctx)
        if on_pass is not None:
            on_pass(p, ctx, "after")
        if p.name == until:
            break
    return ctx
