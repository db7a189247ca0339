"""Policy + groups -> what the rewrite does: per group a sparsity, a static keep count, an estimator.

The rewrite reads only the plan; nothing below this point looks at the policy again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..policy import layer_index
from ..runtime.estimators import describe_estimator
from ..runtime.selection import keep_count
from .groups import Group, Skipped


@dataclass(frozen=True)
class EstimatorChoice:
    kind: str = "svd"
    rank: int = 8
    samples: int = 64
    seed: int = 0
    fraction: float = 0.0

    def describe(self) -> str:
        """Short text for tables, e.g. `token_sample:64+3%`."""
        return describe_estimator(self.kind, self.rank, self.samples, self.fraction)


@dataclass
class GroupPlan:
    """One group's sparse configuration. ``keep`` counts units: channels, or RoPE pairs per head."""

    group: Group
    sparsity: float
    keep: int
    keep_pass: int = 0  # Q/K with partial rotary: pass-through dims kept per head
    estimator: EstimatorChoice = EstimatorChoice()

    @property
    def kept_channels(self) -> int:
        """Channels computed per head (Q/K) or in all (MLP, V/O)."""
        if self.group.kind == "attn_qk":
            pair = 2 if self.group.rope != "none" else 1
            return self.keep * pair + self.keep_pass
        return self.keep


@dataclass
class Plan:
    """What the rewrite does. ``tokens`` / ``dense_tokens`` are the policy's token mode and
    dense-token budget (``"output_dense"``: tokens whose logits enter the loss run dense)."""

    groups: list[GroupPlan]
    dense: list[Skipped]
    sparse_enabled: bool = True
    tokens: str = "all_sparse"
    dense_tokens: float | int = 0.25

    def for_group(self, group: Group) -> GroupPlan | None:
        return next((p for p in self.groups if p.group is group), None)


def qk_units(group: Group) -> tuple[int, int]:
    """(rotary units per head, pass-through dims per head) for a Q/K group."""
    assert group.head_dim is not None
    if group.rope == "none":
        return group.head_dim, 0
    return group.rotary_dim // 2, group.head_dim - group.rotary_dim


def make_plan(groups: list[Group], policy: Any, estimator_rank: int | None = None,
              sparse_enabled: bool = True, layer: int | None = None) -> Plan:
    """Resolve each group's sparsity; dense groups are listed with the reason.

    ``layer`` (``options['layer']``, per-layer compiles): unit names without a layer index are
    resolved as modules of that layer (``Policy.layer_spellings``).
    """
    plans: list[GroupPlan] = []
    dense: list[Skipped] = []
    policy = policy.for_names([u.fqn for g in groups for u in g.units])  # binds the depth for ramps
    for group in groups:
        sparsity = policy.resolve(group.units[0].fqn, group.policy_kind, layer=layer)
        if sparsity is None:
            dense.append(Skipped(group.name, f"{group.kind}: dense by policy"))
            continue
        est = policy.estimator_for(group.policy_kind)
        rank = estimator_rank if (estimator_rank and est.kind == "svd") else (est.rank or 8)
        choice = EstimatorChoice(kind=est.kind, rank=rank, samples=est.samples or 64, seed=est.seed or 0,
                                 fraction=est.fraction or 0.0)
        if group.kind == "attn_qk":
            rot, passthrough = qk_units(group)
            keep = keep_count(rot, sparsity)
            keep_pass = keep_count(passthrough, sparsity) if passthrough else 0
            plans.append(GroupPlan(group, sparsity, keep, keep_pass, choice))
        else:
            plans.append(GroupPlan(group, sparsity, keep_count(group.channels, sparsity), 0, choice))
    return Plan(plans, dense, sparse_enabled, tokens=getattr(policy, "tokens", "all_sparse"),
                dense_tokens=getattr(policy, "dense_tokens", 0.25))


def layer_binding_note(groups: list[Group], policy: Any, layer: int | None, plan: Plan) -> str | None:
    """What to tell the user when unit names and the policy's layer rules do not meet, else None.

    Why: a per-layer compile (FSDP2, torchtune, ``layer.compile``) names its units ``mlp.gate_proj``;
    without ``options['layer']`` the policy's ``layers`` rules, depth ramps and layer patterns
    match nothing, and groups would go dense with no word said.
    """
    names = [u.fqn for g in groups for u in g.units]
    if not names:
        return None
    indexed = [n for n in names if layer_index(n) is not None]
    if layer is not None:
        if not indexed:
            return None
        return (f"options['layer'] = {layer} applies only to units whose names carry no layer index; "
                f"{len(indexed)} of {len(names)} units in this graph carry their own (e.g. `{indexed[0]}`) "
                "and are matched by it: set options['layer'] only when compiling one decoder layer per graph")
    if indexed or not policy.layer_indexed:
        return None
    dense = len(plan.dense)
    effect = ("its groups are dense by policy" if dense == len(groups) else
              f"its groups take the policy's defaults ({dense} of {len(groups)} dense)")
    return (f"the unit names in this graph carry no layer index (e.g. `{names[0]}`: one decoder layer compiled "
            f"on its own, as FSDP2 per layer, torchtune or layer.compile do), so the layer-indexed rules and "
            f"ramps of the policy ({policy.source}) match no unit in this graph: {effect}. Fix: compile each "
            "layer with options={'layer': i, 'num_layers': N, ...} (i its index from 0, N the model's depth), "
            "or use a flat options['sparsity']")
