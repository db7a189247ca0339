"""The ordered pass pipeline: analyse -> group -> plan -> rewrite.

Each pass is a plain function over a ``PassContext``; ``PIPELINE`` lists them in order and prints
as a table (``print(describe_pipeline())``). Every match bumps a counter in
``sparselora_fx.counters.counters["sparselora"]`` (``COUNTERS`` here is that same Counter) so tests
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

from ..counters import counters
from ..factor_cache import cache_stats, prepare_factors
from ..settings import Settings
from . import graph_ops as ops
from .analyse.attention import find_attention_groups
from .analyse.groups import Group, Skipped, expand_fused, find_mlp_groups
from .analyse.units import LoraUnit, detect_unmatched, find_lora_units
from .analyse.unsupported import detect_unsupported
from .plan import Plan, check_policy, layer_binding_note, make_plan
from .rewrite import rewrite_graph
from .weights import oriented_weight, real_weights

log = logging.getLogger("sparselora_fx")

#: The very Counter ``counters["sparselora"]`` (kept under this name: the README documents it).
COUNTERS: collections.Counter[str] = counters["sparselora"]


@dataclass
class PassContext:
    gm: GraphModule
    example_inputs: list[Any]
    settings: Settings
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
    counters["sparselora"]["units_matched"] += len(ctx.units)


def pass_group(ctx: PassContext) -> None:
    """Prove MLP and attention groups from the dataflow; record what could not be grouped."""
    unsupported = detect_unsupported(ctx.gm)  # QLoRA / DoRA: never sparsified, always reported
    unmatched = detect_unmatched(ctx.gm, ctx.units)  # a frozen linear meets LoRA but is no unit
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
    ctx.skipped += [Skipped(name, reason, where) for name, reason, where in unmatched if name not in bad]
    for g in ctx.groups:
        counters["sparselora"][f"group_{g.kind}"] += 1
    counters["sparselora"]["units_skipped"] += len(ctx.units) - len(grouped)


def _ungrouped_reason(unit: LoraUnit) -> str:
    if unit.part is not None:
        return (f"part {unit.part.offset}:{unit.part.offset + unit.part.width} of fused projection "
                f"`{unit.part.parent.fqn}`: not part of any provable MLP or attention group; it runs dense")
    for user in unit.output.users:
        if ops.is_call(user, ops.SPLIT_FNS_WITH_UNBIND, ops.SPLIT_METHODS_WITH_UNBIND):
            return "fused projection (output split into parts) whose parts could not be grouped; it runs dense"
    return "not part of any provable MLP or attention group"


def pass_plan(ctx: PassContext) -> None:
    """Turn the policy into per-group sparsity, keep counts and estimators."""
    layer = ctx.settings.layer
    ctx.plan = make_plan(ctx.groups, ctx.settings.policy, ctx.settings.estimator_rank, ctx.sparse_enabled,
                         layer=layer)
    note = layer_binding_note(ctx.groups, ctx.settings.policy, layer, ctx.plan)
    if note is not None:  # once per backend call: a per-layer graph whose policy cannot see its layer
        warnings.warn(f"sparselora: {note}", stacklevel=2)
        log.warning("sparselora: %s", note)
        ctx.notes.append(note)
    if ctx.sparse_enabled and ctx.groups:  # once per backend call: rules the graph proves select nothing
        names = list(dict.fromkeys([u.fqn for u in ctx.units] + [u.fqn for g in ctx.groups for u in g.units]))
        ctx.notes += check_policy(ctx.gm, names, ctx.settings.policy, layer)


def pass_prepare_estimators(ctx: PassContext) -> None:
    """Build the SVD estimators' factors now (progress bar) when the weights' values are at hand."""
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
        counters["sparselora"]["factors_prepared"] += sum(usable.values())
    if by_rank:
        after = cache_stats()
        ctx.notes.append(f"SVD estimator factors for {sum(len(w) for w in by_rank.values())} weights: "
                         f"built in {after.build_seconds - before.build_seconds:.2f} s "
                         f"({after.misses - before.misses} new, the rest cached), "
                         f"{after.bytes_in_memory / 2**20:.2f} MiB held in memory")


def pass_rewrite(ctx: PassContext) -> None:
    """Write the plan into the graph (estimator -> top-k -> gather ops)."""
    assert ctx.plan is not None
    if not ctx.sparse_enabled:
        return
    ctx.rewritten = rewrite_graph(ctx.gm, ctx.plan, ctx.example_inputs, ctx.skipped)
    counters["sparselora"]["groups_rewritten"] += ctx.rewritten


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
