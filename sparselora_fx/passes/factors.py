"""The estimated weights' SVD factors as inputs of the rewritten graph.

Why: the select ops then read factors the graph holds instead of looking them up per step (see
``sparselora_fx.bound_factors``). For each SVD-estimated weight whose parameter has real values now,
the binding's tensors become buffers of the top-level graph module (``_sparselora_factors_<i>_p`` /
``_q``) read by ``get_attr`` nodes; AOTAutograd lifts them to placeholders. A unit inside a
higher-order-op body (activation checkpointing's ``wrap_body_*``) gets them as extra operands of
each op call on the way down and new placeholders of each body, so no body holds a tensor of its
own (AOTAutograd would bake one into the graph as a constant). A weight without values now (fake
or meta inputs of DDP pieces, DTensor shards) gets None: its select op looks its factors up.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import GraphModule, Node

from .. import bound_factors
from .analyse.units import LoraUnit, Scope
from .weights import orient, orientation


class GraphFactors:
    """Per rewrite of one top-level graph: the factor nodes handed out, so each is made once per scope."""

    def __init__(self, gm: GraphModule, real: dict[Node, torch.Tensor]) -> None:
        self.gm = gm
        self.real = real
        self.top: dict[int, tuple[Node, Node]] = {}  # id(binding) -> get_attr nodes
        self.inner: dict[tuple[int, int], tuple[Node, Node]] = {}  # (id(scope.gm), id(binding)) -> placeholders
        self.bindings: list[bound_factors.Binding] = []

    def nodes_for(self, units: list[LoraUnit | None], rank: int) -> list[Node | None]:
        """[P, Q] nodes for each unit (in ``units``' scope), or all None if any unit has none."""
        present = [u for u in units if u is not None]
        bindings = [self._binding(u, rank) for u in present]
        if any(b is None for b in bindings):  # all or none: no graph input left without a reader
            return [None] * (2 * len(present))
        out: list[Node | None] = []
        for unit, binding in zip(present, bindings):
            out.extend(self._in_scope(unit.scope, binding))  # type: ignore[arg-type]
        return out

    def _binding(self, unit: LoraUnit, rank: int) -> bound_factors.Binding | None:
        param = self.real.get(unit.scope.resolve(unit.weight))  # type: ignore[arg-type]
        if param is None:
            return None
        return bound_factors.bind(param, orientation(unit), rank, orient)

    def _in_scope(self, scope: Scope, binding: bound_factors.Binding) -> tuple[Node, Node]:
        if scope.parent is None:
            return self._top(binding)
        key = (id(scope.gm), id(binding))
        if key not in self.inner:
            outer = self._in_scope(scope.parent, binding)
            self.inner[key] = _thread(scope, outer)
        return self.inner[key]

    def _top(self, binding: bound_factors.Binding) -> tuple[Node, Node]:
        if id(binding) not in self.top:
            i = len(self.top)
            graph = self.gm.graph
            first = next(n for n in graph.nodes if n.op != "placeholder")
            nodes = []
            for side, t in (("p", binding.p), ("q", binding.q)):
                name = f"_sparselora_factors_{i}_{side}"
                self.gm.register_buffer(name, t)
                _add_source(self.gm, name)
                with graph.inserting_before(first):
                    node = graph.get_attr(name)
                node.meta["example_value"] = _fake_like(self.gm.graph, t)
                nodes.append(node)
            self.top[id(binding)] = (nodes[0], nodes[1])
            self.bindings.append(binding)
        return self.top[id(binding)]

    def finish(self) -> None:
        """Record on the graph module which bindings it holds (``bound_factors.guard`` reads it)."""
        if self.bindings:
            self.gm._sparselora_bindings = list(self.bindings)  # type: ignore[attr-defined]


def _thread(scope: Scope, outer: tuple[Node, Node]) -> tuple[Node, Node]:
    """Pass ``outer`` (nodes of the parent scope) into ``scope``'s body: operands of its op call,
    new placeholders after the body's last one."""
    call = scope.call
    assert call is not None
    call.args = (*call.args, *outer)
    graph = scope.gm.graph
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    made = []
    with graph.inserting_after(last):
        for src in reversed(outer):  # inserting_after keeps prepending: reversed keeps the order
            node = graph.placeholder(f"{src.name}_in")
            node.meta["example_value"] = src.meta.get("example_value")
            made.append(node)
    p, q = reversed(made)
    scope.outer_args[p], scope.outer_args[q] = outer
    scope.gm.recompile()
    return p, q


def _fake_like(graph: torch.fx.Graph, t: torch.Tensor) -> Any:
    """A fake of ``t`` in the fake mode of ``graph``'s placeholders (None without one)."""
    for n in graph.nodes:
        val = n.meta.get("example_value")
        mode = getattr(val, "fake_mode", None)
        if mode is not None:
            return mode.from_tensor(t, static_shapes=True)
    return None


def _add_source(gm: GraphModule, name: str) -> None:
    """A Dynamo graph lists a source per lifted parameter; AOTAutograd asserts every one has one."""
    sources = getattr(gm, "_param_name_to_source", None)
    if isinstance(sources, dict):
        from .. import _compat

        sources[name] = _compat.constant_source(name)
