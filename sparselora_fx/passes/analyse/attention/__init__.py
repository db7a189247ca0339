"""Prove attention groups: [q, k] share head-dim channels, [v, o] share value channels.

Both hold only when the graph between the projections and the attention op is made of ops that
keep each head-dim channel in place; anything else stops the proof and lands in ``skipped`` with
the op and the node that stopped it.

Modules: ``qk`` finds the attention ops (SDPA, eager) and groups q/k; ``vo`` walks the output to o
and groups v/o; ``layout`` walks each operand back to its projection (head views, RoPE, GQA, KV
cache); ``common`` holds the records and graph helpers they share. Torch targets come from
``passes.graph_ops``.
"""

from __future__ import annotations

import logging
from typing import Any

from torch.fx import Node

from ..groups import Group, Skipped
from ..units import LoraUnit, last_dim_piece
from .common import FUSED_REASON, _NotAttn, _Side, _Site, _skip, _try
from .layout import HEAD_NORM_REASON, _trace_operand
from .qk import _find_sites, _group_qk, _padding_mask
from .vo import _group_vo, _trace_output

__all__ = ["FUSED_REASON", "HEAD_NORM_REASON", "find_attention_groups"]

log = logging.getLogger("sparselora_fx")


def _check_fused_sides(results: list[Any]) -> list[Any]:
    """Sides that are parts of a fused projection, kept only when the fused output is read through
    its pieces alone: the rewrite computes the union of the kept rows, so any other reader of the
    fused output (or of the view/split between) would see dropped rows as zeros."""
    sides = [r for r in results if isinstance(r, _Side) and r.unit.part is not None]
    out = list(results)
    for side in sides:
        part = side.unit.part
        family = [s for s in sides if s.unit.part.parent is part.parent]  # type: ignore[union-attr]
        shared = {n for s in family for n in s.shared}
        traced = {s.unit.part.piece: s.unit.part for s in family}  # type: ignore[union-attr]
        for node in shared:
            for user in node.users:
                if user in shared or user in traced:
                    continue
                other = last_dim_piece(user)
                if other is not None and other[0] in shared and not any(
                        other[1] < p.offset % p.period + p.block and p.offset % p.period < other[2]
                        for p in traced.values() if p.block != p.width) and not any(
                        other[1] < p.offset + p.width and p.offset < other[2]
                        for p in traced.values() if p.block == p.width):
                    continue  # an untraced part: its rows stay dense
                out[results.index(side)] = _NotAttn(
                    f"the fused projection `{part.parent.fqn}` is also read by `{user.name}`, not through "
                    "its q/k/v pieces", user, part.parent)
                break
            else:
                continue
            break
    return out


def _site_groups(site: _Site, by_output: dict[Node, LoraUnit], by_input: dict[Node, list[LoraUnit]],
                 groups: list[Group], skipped: list[Skipped]) -> None:
    q = _try(_trace_operand, site.query, "q", by_output)
    k = _try(_trace_operand, site.key, "k", by_output)
    v = _try(_trace_operand, site.value, "v", by_output)
    out = _try(_trace_output, site, by_input)
    mask = _padding_mask(site.mask)

    def unit_of(res: Any) -> LoraUnit | None:
        return res.unit if isinstance(res, (_Side, _NotAttn)) else res[0]

    q, k, v = _check_fused_sides([q, k, v])

    fused: set[int] = set()
    for res in (q, k, v):
        if isinstance(res, _NotAttn) and res.split and res.unit is not None:
            others = [unit_of(r) for r in (q, k, v) if r is not res]
            if any(u is res.unit for u in others):
                res.reason = FUSED_REASON
                fused.add(id(res.unit))

    # fused projections another operand reached a part of: a failure on one is that side's part
    split_parents = {id(r.unit.part.parent) for r in (q, k, v) if isinstance(r, _Side) and r.unit.part is not None}

    def report(err: _NotAttn, prefix: str, units: list[LoraUnit | None], side: str = "") -> None:
        for unit in [err.unit, *units]:
            if unit is None:
                continue
            reason = FUSED_REASON if (err.reason == FUSED_REASON or id(unit) in fused) else f"{prefix}: {err.reason}"
            name = f"{unit.fqn}[{side}]" if side and id(unit) in split_parents else None
            _skip(skipped, unit, reason, err.where, name)

    # q/k
    if isinstance(q, _NotAttn) or isinstance(k, _NotAttn):
        err = q if isinstance(q, _NotAttn) else k
        if err.unit is not None or any(isinstance(r, _Side) for r in (q, k)):
            report(err, "attention q/k not grouped", [unit_of(r) for r in (q, k)], "q" if err is q else "k")
    else:
        res = _try(_group_qk, site, q, k, mask)
        if isinstance(res, Group):
            groups.append(res)
        else:
            report(res, "attention q/k not grouped", [q.unit, k.unit])
    # v/o
    if isinstance(v, _NotAttn) or isinstance(out, _NotAttn):
        err = v if isinstance(v, _NotAttn) else out
        o_unit = unit_of(out)
        if isinstance(v, _NotAttn) and v.reason == FUSED_REASON and o_unit is not None:
            _skip(skipped, o_unit, FUSED_REASON, v.where)
        if err.unit is not None or isinstance(v, _Side) or not isinstance(out, _NotAttn):
            report(err, "attention v/o not grouped", [unit_of(v), o_unit], "v" if err is v else "")
    else:
        res = _try(_group_vo, site, v, out, mask)
        if isinstance(res, Group):
            groups.append(res)
        else:
            report(res, "attention v/o not grouped", [v.unit, out[0]])


def find_attention_groups(units: list[LoraUnit]) -> tuple[list[Group], list[Skipped]]:
    """``attn_qk`` [q, k] and ``attn_vo`` [v, o] groups, proven per attention op from the dataflow.

    Each graph scope the units live in is searched for SDPA and eager attention ops; each operand is
    walked back to the unit it is a head view of. A group's units share the attention op's scope.
    Units already carrying a role (grouped elsewhere) are not regrouped. Fused q/k/v projections and
    paths with ops this pass cannot prove head-preserving are returned in ``skipped``.
    """
    groups: list[Group] = []
    skipped: list[Skipped] = []
    scopes: dict[int, Any] = {}
    for unit in units:
        scopes.setdefault(id(unit.scope), unit.scope)
    for scope in scopes.values():
        members = [u for u in units if u.scope is scope]
        by_output = {u.output: u for u in members}
        by_input: dict[Node, list[LoraUnit]] = {}
        for u in members:
            by_input.setdefault(u.input, []).append(u)
        for site in _find_sites(scope.gm.graph.nodes):
            _site_groups(site, by_output, by_input, groups, skipped)
    log.debug("attention: %d groups, %d skipped", len(groups), len(skipped))
    return groups, skipped
