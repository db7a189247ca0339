"""Which rules of a policy provably select nothing, judged from what one compiled graph shows.

Why its own module: `Policy.check_names` (policy/model.py) judges a rule against every module
name of a model, which `explain()` and `sparselora-fx inspect` have. The backend sees one Dynamo
graph at a time: under DDP or a graph break a graph holds some layers only, or only the LM head,
and a per-layer compile holds one decoder layer. A rule that matches nothing in *this* graph
may match in the next, so the backend only reports what the graph proves cannot match anywhere
in the model (`unmatched_rules`); docs/policy.md "Rules that match nothing" states the rule.
`GraphNames` is the evidence, gathered by the plan pass (passes/plan.py) from the graph.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import PolicyError
from .matching import (
    _candidates,
    _pattern_matches,
    _prefixes,
    normalize_module_name,
    pattern_admits_layer,
    pattern_head,
    pattern_layer_stack,
)
from .rules import Rule
from .values import _layers_text
from .writing import _toml_value, rule_to_dict

__all__ = [
    "GraphNames",
    "PolicyWarning",
    "UnmatchedRule",
    "UnmatchedRuleError",
    "sets_no_sparsity",
    "unmatched_message",
    "unmatched_rules",
]


class PolicyWarning(UserWarning):
    """A policy the backend can run but that likely does not do what was meant."""


class UnmatchedRuleError(PolicyError):
    """SPARSELORA_STRICT=1: a rule that selects no module of the model is an error, not a warning."""


@dataclass(frozen=True)
class GraphNames:
    """What one compiled graph shows of the model's module names, and how much of the model it holds.

    ``modules``: normalised paths of every module that ran in the graph (LoRA units and the rest:
    norms, embeddings, the LM head), plus the units. ``stacks``: the layer stacks its units sit in
    (`model.layers`). ``depth``: the model's number of layers when known for certain (the
    policy's / options' ``num_layers``, or this graph runs past the end of its stack).
    ``whole_stacks``: stacks this graph holds from before their first layer to after their last,
    every layer in between (so every module under them is in ``modules``). ``names_checkable``:
    False for per-layer compiles, whose names are spelled from the policy's own patterns.
    """

    modules: tuple[str, ...] = ()
    stacks: tuple[str, ...] = ()
    depth: int | None = None
    whole_stacks: tuple[str, ...] = ()
    names_checkable: bool = True
    _cands: tuple[tuple[str, tuple[str, ...]], ...] = field(default=(), init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        mods = tuple(dict.fromkeys(normalize_module_name(m) for m in self.modules if m))
        object.__setattr__(self, "modules", mods)
        object.__setattr__(self, "_cands", tuple((m, tuple(_candidates(m))) for m in mods))

    def matches(self, pattern: str) -> bool:
        """Whether `pattern` matches any module (or a parent) this graph shows."""
        return any(_pattern_matches(pattern, m, c) for m, c in self._cands)

    def children(self, head: Sequence[str]) -> set[str]:
        """The names directly under path `head` ('' for the top) among the modules this graph shows."""
        n = len(head)
        return {parts[n] for m in self.modules if len(parts := m.split(".")) > n and tuple(parts[:n]) == tuple(head)}

    def has_path(self, head: Sequence[str]) -> bool:
        """Whether some module this graph shows is `head` or lies under it."""
        prefix = ".".join(head)
        return any(m == prefix or m.startswith(prefix + ".") for m in self.modules)


@dataclass(frozen=True)
class UnmatchedRule:
    """One rule the graph proves selects nothing, with why, the nearest real names and the fix."""

    index: int
    rule: Rule
    reasons: tuple[str, ...]
    nearest: tuple[str, ...]
    fix: str

    @property
    def rule_text(self) -> str:
        """The rule as it reads in a file: `{match = "model.layer.*.mlp", mlp = 0.9}`."""
        return _toml_value(rule_to_dict(self.rule))

    def text(self) -> str:
        near = f" Nearest names: {', '.join(self.nearest)}." if self.nearest else ""
        return f"rules[{self.index}] {self.rule_text}: {'; '.join(self.reasons)}.{near} Fix: {self.fix}"


def sets_no_sparsity(policy: Any) -> bool:
    """Whether no default and no rule of the policy sets a sparsity: every group runs dense."""
    return all(v is None for v in policy._values())


def unmatched_rules(policy: Any, graph: GraphNames) -> list[UnmatchedRule]:
    """The rules (and `match` patterns) of `policy` that `graph` proves select no module of the model.

    A `layers` selector is reported when the depth is known and it selects no layer in
    0..depth-1. A `match` pattern is reported when it matches no module of the graph and either
    (1) its layer slot admits no layer below the known depth (`model.layers.50.mlp`), (2) its
    literal head leaves the paths the graph shows by one typo (`model.layer.*` where the graph
    has `model.layers`, `modle.layers.*`), (3) it names a non-index child of a layer stack
    (`model.layers.mlp`), or (4) it lies inside a stack this graph holds whole
    (`model.layers.*.mpl`). Anything else may match in another graph: not reported.
    """
    found: list[UnmatchedRule] = []
    for i, rule in enumerate(policy.rules):
        reasons: list[str] = []
        nearest: list[str] = []
        fixes: list[str] = []
        if rule.layers and graph.depth is not None:
            n = graph.depth
            if not any(rule._layer_selected(k, n) for k in range(n)):
                reasons.append(f"layers {_layers_text(rule.layers)!r} select no layer of this {n}-layer model "
                               f"(layers count from 0 to {n - 1}; negative ones from -1, the last, to -{n})")
                fixes.append(f"select layers within 0..{n - 1} (0 is the first layer; {n - 1}, or -1, the last), "
                             "or, if the model is deeper than this graph shows, set num_layers to its depth")
        for pattern in rule.match:
            why = _pattern_unmatched(pattern, graph)
            if why is not None:
                reasons.append(f"match {pattern!r} {why}")
                near = _nearest(pattern, graph)
                nearest += near
                meant = f" (e.g. {near[0]!r})" if near else ""
                fixes.append(f"write {pattern!r} as a module path the model has{meant}, or remove it")
        if reasons:
            found.append(UnmatchedRule(i, rule, tuple(reasons), tuple(dict.fromkeys(nearest))[:3],
                                       "; ".join(fixes) + "."))
    return found


def unmatched_message(policy: Any, found: Sequence[UnmatchedRule]) -> str:
    """The one warning (or strict error) for a graph: every unmatched rule, what it does not do, the fix."""
    n = len(found)
    head = (f"policy {policy.source}: {n} rule{'s' if n > 1 else ''} select{'' if n > 1 else 's'} no module of "
            "this model, so the modules meant stay at what the other rules and [defaults] give them "
            "(dense where those set nothing, sparse where they do):")
    body = "\n".join(f"  {f.text()}" for f in found)
    tail = ("Set SPARSELORA_STRICT=1 to make this an error; explain(model, ...) reports every rule against "
            "every module of the model.")
    return f"{head}\n{body}\n{tail}"


# ---- patterns --------------------------------------------------------------------------------


def _pattern_unmatched(pattern: str, graph: GraphNames) -> str | None:
    """Why the graph proves `pattern` selects nothing in the model, or None."""
    if graph.matches(pattern):
        return None
    stack = pattern_layer_stack(pattern)
    if graph.depth is not None and stack in graph.stacks:
        if not any(pattern_admits_layer(pattern, k) for k in range(graph.depth)):
            return f"names no layer of this {graph.depth}-layer model (layers count from 0 to {graph.depth - 1})"
    if not graph.names_checkable:
        return None
    head = pattern_head(pattern)
    if not head or graph.has_path(head):
        return _inside_whole_stack(pattern, head, graph)
    d = max(k for k in range(len(head)) if k == 0 or graph.has_path(head[:k]))
    parent, missing = ".".join(head[:d]), ".".join(head[: d + 1])
    if parent in graph.stacks:  # a layer stack (a ModuleList) has only its layers under it
        return (f"names `{missing}`, but the modules under the layer stack `{parent}` are its layers: a "
                f"layer index (or `*`) goes after `{parent}.`")
    children = sorted(graph.children(head[:d]))
    typo = next((c for c in children if _one_edit_apart(head[d], c)), None)
    if typo is not None:  # a misspelling, not another subtree (`encoder` / `decoder` are two edits apart)
        where = f"`{parent}` has `{parent}.{typo}`" if parent else f"its names start with `{typo}`"
        return f"names `{missing}`, which the model does not have ({where})"
    return None


def _inside_whole_stack(pattern: str, head: Sequence[str], graph: GraphNames) -> str | None:
    stack = pattern_layer_stack(pattern)
    joined = ".".join(head)
    for s in graph.whole_stacks:
        if stack == s or joined == s or joined.startswith(s + "."):
            return (f"matches no module of `{s}`, and this graph holds every layer of it (0 to "
                    f"{graph.depth - 1 if graph.depth else '?'})")
    return None


_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)")


def _nearest(pattern: str, graph: GraphNames) -> list[str]:
    """The 3 module paths of the graph closest to the pattern, in the pattern's own style."""
    if pattern.startswith("re:"):
        needle = pattern[3:].replace("\\.", ".")
        pool = {p for m in graph.modules for p in _prefixes(m)}
    else:
        needle = normalize_module_name(pattern)
        pool = {p for m in graph.modules for p in _prefixes(m)}
        if any(ch in needle for ch in "*?["):  # globs: offer the starred layer too (`model.layers.*.mlp`)
            pool |= {_INDEX.sub("*", p) for p in pool}
    return difflib.get_close_matches(needle, sorted(pool), n=3, cutoff=0.0)


def _one_edit_apart(a: str, b: str) -> bool:
    """Whether `b` is `a` with one character inserted, deleted, replaced, or two neighbours swapped
    (`modle` / `model`, `layer` / `layers`); names under 4 characters never count (`wte` / `wpe`)."""
    if a == b or abs(len(a) - len(b)) > 1 or min(len(a), len(b)) < 4:  # `q` / `k`: real siblings
        return False
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        return len(diff) == 1 or (len(diff) == 2 and diff[1] == diff[0] + 1
                                  and a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]])
    short, long = (a, b) if len(a) < len(b) else (b, a)
    i = next((k for k in range(len(short)) if short[k] != long[k]), len(short))
    return short[i:] == long[i + 1:]
