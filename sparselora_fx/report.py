"""What the passes found and decided, as data (for tests and JSON) and as tables (for people)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from tabulate import tabulate


@dataclass
class UnitInfo:
    fqn: str
    role: str
    in_features: int
    out_features: int
    lora_rank: int
    group: str = ""
    sparsity: float | None = None

    @property
    def dense_flops_per_token(self) -> int:
        """Forward FLOPs of the frozen linear per token (2 * in * out)."""
        return 2 * self.in_features * self.out_features


@dataclass
class GroupInfo:
    kind: str
    name: str
    units: list[UnitInfo]
    num_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    rope: str = "none"
    rotary_dim: int = 0
    act: str | None = None
    sparsity: float | None = None
    keep: int | None = None
    channels: int | None = None
    estimator: str = ""


@dataclass
class SkippedInfo:
    name: str
    reason: str
    where: str = ""


@dataclass
class Report:
    """The result of the analysis passes for one or more Dynamo graphs."""

    units: list[UnitInfo] = field(default_factory=list)
    groups: list[GroupInfo] = field(default_factory=list)
    skipped: list[SkippedInfo] = field(default_factory=list)
    graphs: int = 0
    notes: list[str] = field(default_factory=list)

    def extend(self, other: "Report") -> None:
        self.units += other.units
        self.groups += other.groups
        self.skipped += other.skipped
        self.graphs += other.graphs
        self.notes += other.notes

    def counts(self) -> dict[str, int]:
        out = {"units": len(self.units), "groups": len(self.groups), "skipped": len(self.skipped)}
        for g in self.groups:
            out[g.kind] = out.get(g.kind, 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def unit_table(self) -> str:
        rows = [[u.fqn, u.role or "-", u.group or "-", u.in_features, u.out_features, u.lora_rank,
                 f"{u.dense_flops_per_token:,}", _fmt_sparsity(u.sparsity)] for u in self.units]
        return tabulate(rows, headers=["unit", "role", "group", "in", "out", "lora r", "dense FLOPs/token",
                                       "sparsity"], tablefmt="simple")

    def group_table(self) -> str:
        rows = []
        for g in self.groups:
            heads = f"{g.num_heads}/{g.num_kv_heads}x{g.head_dim}" if g.num_heads else "-"
            rope = f"{g.rope}:{g.rotary_dim}" if g.rope != "none" else "-"
            keep = f"{g.keep}/{g.channels}" if g.keep is not None else "-"
            rows.append([g.name, g.kind, len(g.units), g.act or "-", heads, rope, _fmt_sparsity(g.sparsity), keep,
                         g.estimator or "-"])
        return tabulate(rows, headers=["group", "kind", "units", "act", "heads q/kv x dim", "rope", "sparsity",
                                       "keep", "estimator"], tablefmt="simple")

    def skipped_table(self) -> str:
        rows = [[s.name, s.reason, s.where or "-"] for s in self.skipped]
        return tabulate(rows, headers=["not sparsified", "reason", "node"], tablefmt="simple")

    def __str__(self) -> str:
        parts = [f"sparselora: {len(self.units)} LoRA units, {len(self.groups)} groups, "
                 f"{len(self.skipped)} skipped, over {self.graphs} graph(s)", "", self.group_table(), "",
                 self.unit_table()]
        if self.skipped:
            parts += ["", self.skipped_table()]
        parts += [f"note: {n}" for n in self.notes]
        return "\n".join(parts)


def _fmt_sparsity(s: float | None) -> str:
    return "dense" if s is None else f"{s:.2f}"


def build_report(ctx: Any) -> Report:
    """Turn a finished ``PassContext`` into a Report (plain data, no graph references)."""
    plan = ctx.plan
    group_of: dict[int, tuple[Any, Any]] = {}
    for g in ctx.groups:
        gp = plan.for_group(g) if plan is not None else None
        for u in g.units:
            group_of[id(u)] = (g, gp)
    units: dict[int, UnitInfo] = {}
    for u in ctx.units:
        g, gp = group_of.get(id(u), (None, None))
        units[id(u)] = UnitInfo(fqn=u.fqn, role=u.role, in_features=u.in_features, out_features=u.out_features,
                                lora_rank=u.lora_rank, group=g.name if g is not None else "",
                                sparsity=gp.sparsity if gp is not None else None)
    groups = []
    for g in ctx.groups:
        gp = plan.for_group(g) if plan is not None else None
        est = gp.estimator.describe() if gp else ""
        groups.append(GroupInfo(kind=g.kind, name=g.name, units=[units[id(u)] for u in g.units],
                                num_heads=g.num_heads, num_kv_heads=g.num_kv_heads, head_dim=g.head_dim,
                                rope=g.rope, rotary_dim=g.rotary_dim, act=g.act,
                                sparsity=gp.sparsity if gp else None, keep=gp.kept_channels if gp else None,
                                channels=g.channels, estimator=est))
    skipped = [SkippedInfo(s.name, s.reason, s.where) for s in ctx.skipped]
    return Report(units=list(units.values()), groups=groups, skipped=skipped, graphs=1,
                  notes=list(getattr(ctx, "notes", [])))
