"""Policy + groups -> what the rewrite does: per group a sparsity, a static keep count, an estimator.

The rewrite reads only the plan; nothing below this point looks at the policy again.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any

from ..errors import PolicyError
from ..names import PEFT_ROOTS, normalize_module_name, source_to_path
from ..policy import EstimatorSpec, layer_index
from ..policy.checking import (
    GraphNames,
    PolicyWarning,
    UnmatchedRuleError,
    sets_no_sparsity,
    unmatched_message,
    unmatched_rules,
)
from ..runtime.selection import keep_count
from .analyse.groups import Group, Skipped

log = logging.getLogger("sparselora_fx")


@dataclass
class GroupPlan:
    """One group's sparse configuration. ``keep`` counts units: channels, or RoPE pairs per head."""

    group: Group
    sparsity: float
    keep: int
    keep_pass: int = 0  # Q/K with partial rotary: pass-through dims kept per head
    estimator: EstimatorSpec = EstimatorSpec()  # the policy's, with options['estimator_rank'] applied

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
        choice = policy.estimator_for(group.policy_kind)
        if estimator_rank and choice.kind == "svd":
            choice = dataclasses.replace(choice, rank=estimator_rank)
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


# ---------------------------------------------------------------------------------------------
# Rules that select nothing: what this graph proves (policy/checking.py judges, this reads the graph)
# ---------------------------------------------------------------------------------------------

_DOTTED_INDEX = re.compile(r"\.(\d+)(?=[.\[]|$)")  # `...layers.1.mlp` in nn_module_stack: `layers[1]`


def _node_module_path(node: Any) -> str:
    """The user-visible path of the innermost module a graph node ran in ('' when none)."""
    stack = node.meta.get("nn_module_stack") if hasattr(node, "meta") else None
    if not stack:
        return ""
    entry = list(stack.values())[-1]
    raw = entry[0] if isinstance(entry, (tuple, list)) else entry
    if not isinstance(raw, str) or not raw.startswith("L["):
        return ""
    path = normalize_module_name(source_to_path(_DOTTED_INDEX.sub(r"[\1]", raw)))
    if path in PEFT_ROOTS or any(p.startswith("__") for p in path.split(".")):
        return ""  # the PEFT wrapper itself, or a function Dynamo names as a module
    return path


def _stack_of(name: str) -> str | None:
    """`model.layers` for `model.layers.3.mlp.gate_proj`: the path before the layer index."""
    parts = normalize_module_name(name).split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i]) or None
    return None


def graph_names(gm: Any, unit_names: list[str], policy: Any, layer: int | None) -> GraphNames:
    """What ``gm`` shows of the model: its module paths, layer stacks, and the depth it proves.

    Why: the plan pass may only report a rule that can match nothing anywhere in the model, and
    one graph may be a DDP piece or one side of a graph break. Dynamo graphs are contiguous
    traces, so a graph whose nodes run modules outside a stack both before its first layer
    (embeddings) and after its last (the final norm, the LM head) holds that whole stack; one
    that only runs past the end of the stack proves its depth (last index + 1). A per-layer
    compile (``layer`` set) proves only the depth the policy / options give.
    """
    if layer is not None:
        spelled = [s for n in unit_names for s in policy.layer_spellings(n, layer)]
        stacks = tuple(dict.fromkeys(s for s in map(_stack_of, spelled) if s))
        return GraphNames(modules=tuple(spelled), stacks=stacks, depth=policy.num_layers, names_checkable=False)
    paths = [_node_module_path(n) for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    stacks = tuple(dict.fromkeys(s for s in map(_stack_of, unit_names) if s))
    ended: dict[str, int] = {}
    whole: list[str] = []
    for stack in stacks:
        inside = [(i, layer_index(p[len(stack) + 1:])) for i, p in enumerate(paths)
                  if p.startswith(stack + ".") and p[len(stack) + 1:].split(".")[0].isdigit()]
        if not inside:
            continue
        first, last = inside[0][0], inside[-1][0]
        outside = [i for i, p in enumerate(paths)
                   if p and not p.startswith(stack + ".") and p != stack and not stack.startswith(p + ".")]
        indices = {k for _, k in inside if k is not None}
        if any(i > last for i in outside):
            ended[stack] = max(indices) + 1
            if any(i < first for i in outside) and indices == set(range(max(indices) + 1)):
                whole.append(stack)
    depth = policy.num_layers
    if depth is None and stacks and all(s in ended for s in stacks):
        depth = max(ended.values())
    nested = [_node_module_path(n) for sub in (gm.modules() if hasattr(gm, "modules") else ())
              if sub is not gm and hasattr(sub, "graph") for n in sub.graph.nodes]  # HOP bodies (checkpoint)
    modules = tuple(unit_names) + tuple(p for p in paths + nested if p)
    return GraphNames(modules=modules, stacks=stacks, depth=depth, whole_stacks=tuple(whole))


def _strict() -> bool:
    return os.environ.get("SPARSELORA_STRICT") == "1"


def check_policy(gm: Any, unit_names: list[str], policy: Any, layer: int | None) -> list[str]:
    """Warn once for this graph about rules that select no module of the model, and about a policy
    that sets no sparsity at all; returns the notes for the report.

    Why: a typo (`model.layer.*.mlp`, `layers = "50-60"` on a 2-layer model) would otherwise train
    dense, or leave meant-dense layers sparse, with no word said. SPARSELORA_STRICT=1 turns the
    unmatched-rule warning into an ``UnmatchedRuleError`` (a PolicyError: the backend raises it).
    """
    notes: list[str] = []
    try:
        found = unmatched_rules(policy, graph_names(gm, unit_names, policy, layer))
    except PolicyError:
        raise
    except Exception:  # a diagnostic must never cost the user a sparse graph
        if _strict():
            raise
        log.warning("sparselora: could not check the policy's rules against this graph", exc_info=True)
        found = []
    if found:
        message = unmatched_message(policy, found)
        if _strict():
            raise UnmatchedRuleError(message)
        warnings.warn(f"sparselora: {message}", PolicyWarning, stacklevel=3)
        log.warning("sparselora: %s", message)
        notes += [f"policy {policy.source}: {f.text()}" for f in found]
    if sets_no_sparsity(policy) and policy != _dense_preset():
        message = (f"policy {policy.source} sets no sparsity (no [defaults] mlp / attn and no rule with one): "
                   "every group of this graph runs dense and the backend changes nothing. Set e.g. "
                   "[defaults] mlp = 0.9, or pass policy=\"dense\" to run dense on purpose")
        warnings.warn(f"sparselora: {message}", PolicyWarning, stacklevel=3)
        log.warning("sparselora: %s", message)
        notes.append(message)
    return notes


def _dense_preset() -> Any:
    from ..policy import Policy

    return Policy.preset("dense")
