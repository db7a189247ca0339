"""Find linear+LoRA units: a frozen base linear whose output is summed with ``s * B(A(drop(x)))``.

This is the first pass. It works on the Dynamo graph (torch-level ops, before autograd), recurses
into higher-order-op bodies (activation checkpointing's ``wrap_body_*``), and names each unit by
the module path a user sees (``model.layers.3.mlp.gate_proj``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch.fx import GraphModule, Node

from ..._compat import dynamo_source_name
from ...names import module_of_param, source_to_path
from .. import graph_ops as ops

log = logging.getLogger("sparselora_fx")


@dataclass
class Scope:
    """A graph plus how its placeholders map to the enclosing graph (for HOP bodies)."""

    gm: GraphModule
    name: str = ""
    parent: "Scope | None" = None
    outer_args: dict[Node, object] = field(default_factory=dict)
    call: Node | None = None  # the higher-order op node in ``parent`` that calls this body

    def resolve(self, node: object) -> object:
        """Follow a placeholder out to the outermost graph node that feeds it."""
        scope: Scope | None = self
        while isinstance(node, Node) and node.op == "placeholder" and scope is not None and node in scope.outer_args:
            node = scope.outer_args[node]
            scope = scope.parent
        return node


@dataclass
class LoraBranch:
    """One adapter's ``scale * B(A(dropout(x)))`` on the unit's input."""

    a: ops.LinearCall
    b: ops.LinearCall
    scale: float | None  # None when the scale is a graph value (a float input under dynamic=True)
    scale_node: Node | None
    dropout: Node | None
    output: Node  # the node summed into the base output

    @property
    def rank(self) -> int:
        return int(ops.example_value(self.a.node).shape[-1])


@dataclass
class PostOp:
    """An op between the frozen product and the first LoRA sum that commutes with channel selection.

    ``kind`` is ``"cast"`` (a dtype cast), ``"bias"`` (``+ b``, b a frozen ``[out]`` vector, either
    operand order) or ``"scale"`` (``* g``, g a frozen ``[out]`` vector or a scalar). ``operand`` is
    b / g as the op reads it (None for a cast); ``vector`` is True for an ``[out]`` operand, which
    the rewrite hands only the kept channels (``rewrite._narrow_post`` / ``_scatter_base``).
    """

    node: Node
    kind: str
    operand: object = None
    vector: bool = False


@dataclass
class LoraUnit:
    """A frozen linear plus its LoRA branches, as found in one graph scope.

    ``post`` are the ops between the frozen product (``base.node``) and the first LoRA sum, in
    order: a hand-written ``y = x @ W.T; y = y + b; y = y + lora(x)`` has its bias add there.
    """

    fqn: str
    scope: Scope
    base: ops.LinearCall
    input: Node
    branches: list[LoraBranch]
    adds: list[Node]
    output: Node
    in_features: int
    out_features: int
    role: str = ""
    post: list[PostOp] = field(default_factory=list)
    part: "FusedPart | None" = None  # set on a part of a fused projection (see ``part_unit``)
    parts: dict[tuple[int, int, int], "LoraUnit"] = field(default_factory=dict, repr=False)

    @property
    def weight(self) -> Node:
        return self.base.weight

    @property
    def bias(self) -> Node | None:
        """The frozen bias of the whole linear.

        A part of a fused projection has none of its own: the rewrite slices the parent's bias
        together with the weight rows (``rewrite._oriented``), so asking a part fails loudly
        rather than hand back the whole fused bias.
        """
        if self.part is not None and self.base.bias is not None:
            raise AssertionError(f"{self.fqn}: a part's bias is its rows of `{self.part.parent.fqn}`'s bias; "
                                 "take it from rewrite._oriented")
        return self.base.bias

    @property
    def graph_module(self) -> GraphModule:
        return self.scope.gm

    @property
    def lora_rank(self) -> int:
        return sum(b.rank for b in self.branches)


@dataclass(eq=False)
class FusedPart:
    """Which output rows of a fused projection (qkv_proj, gate_up_proj, c_attn) one part reads.

    Part channel ``c`` is fused row ``(c // block) * period + offset + c % block``: a contiguous
    range has ``block = width`` (Phi-3, GPT-2); GPT-NeoX's per-head ``[q_h, k_h, v_h]`` layout has
    ``block = head_dim``, ``period = 3 * head_dim``. ``piece`` is the graph node holding the part.
    """

    parent: "LoraUnit"
    name: str
    offset: int
    width: int
    block: int
    period: int
    piece: Node

    def rows(self) -> list[int]:
        """Every fused row of this part, in part-channel order."""
        return [(c // self.block) * self.period + self.offset + c % self.block for c in range(self.width)]


def part_unit(parent: LoraUnit, name: str, offset: int, width: int, piece: Node, *, block: int | None = None,
              period: int | None = None) -> LoraUnit:
    """The unit standing for one part of ``parent``'s output (one object per part, reused).

    It shares the parent's frozen linear, input and LoRA; ``output`` is the piece, ``out_features``
    the part's width, ``fqn`` the parent's with ``[name]``.
    """
    block = width if block is None else block
    period = parent.out_features if period is None else period
    key = (offset, block, period)
    unit = parent.parts.get(key)
    if unit is None or unit.output is not piece:
        unit = LoraUnit(fqn=f"{parent.fqn}[{name}]", scope=parent.scope, base=parent.base, input=parent.input,
                        branches=parent.branches, adds=parent.adds, output=piece, in_features=parent.in_features,
                        out_features=width, post=parent.post,
                        part=FusedPart(parent, name, offset, width, block, period, piece))
        parent.parts[key] = unit
    return unit


def _split_bounds(split: Node, width: int) -> list[tuple[int, int]] | None:
    """The [start, stop) of each piece of a last-dim chunk/split of a ``width``-wide tensor."""
    src = split.args[0]
    val = ops.example_value(src)
    if not isinstance(val, torch.Tensor) or val.dim() < 1:
        return None
    name = split.target if isinstance(split.target, str) else split.target.__name__
    if name == "tensor_split":
        return None
    size = split.args[1] if len(split.args) > 1 else split.kwargs.get("chunks", split.kwargs.get(
        "split_size_or_sections", split.kwargs.get("split_size", split.kwargs.get("split_sizes"))))
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    if not isinstance(dim, int) or dim % val.dim() != val.dim() - 1:
        return None
    if name == "chunk":
        if not isinstance(size, int) or size < 1:
            return None
        step = -(-width // size)
        sizes = [min(step, width - i) for i in range(0, width, step)]
    elif isinstance(size, int):
        sizes = [min(size, width - i) for i in range(0, width, size)]
    elif isinstance(size, (list, tuple)) and all(isinstance(v, int) for v in size):
        sizes = list(size)
    else:
        return None
    if sum(sizes) != width:
        return None
    bounds, start = [], 0
    for n in sizes:
        bounds.append((start, start + n))
        start += n
    return bounds


def last_dim_piece(node: object) -> tuple[Node, int, int, Node | None] | None:
    """``node`` as a contiguous piece of its source's last dim: (source, start, stop, split node).

    Recognises ``chunk``/``split`` items along the last dim and ``src[..., a:b]`` slices.
    """
    import operator

    if not (isinstance(node, Node) and node.op == "call_function" and node.target is operator.getitem):
        return None
    src, idx = node.args
    if not isinstance(src, Node):
        return None
    if ops.is_call(src, ops.SPLIT_FNS, ops.SPLIT_METHODS) and isinstance(idx, int):
        inner = src.args[0]
        val = ops.example_value(inner)
        if not isinstance(inner, Node) or not isinstance(val, torch.Tensor) or not isinstance(val.shape[-1], int):
            return None
        bounds = _split_bounds(src, int(val.shape[-1]))
        if bounds is None or not 0 <= idx < len(bounds):
            return None
        return inner, bounds[idx][0], bounds[idx][1], src
    val = ops.example_value(src)
    if not isinstance(val, torch.Tensor) or not isinstance(val.shape[-1], int):
        return None
    items = idx if isinstance(idx, tuple) else (idx,)
    if items and items[0] is Ellipsis:
        rest = items[1:]
    elif len(items) == val.dim() and all(i == slice(None) for i in items[:-1]):
        rest = items[-1:]
    else:
        return None
    if len(rest) != 1 or not isinstance(rest[0], slice):
        return None
    sl = rest[0]
    if any(v is not None and not isinstance(v, int) for v in (sl.start, sl.stop, sl.step)):
        return None
    start, stop, step = sl.indices(int(val.shape[-1]))
    if step != 1 or stop <= start:
        return None
    return src, start, stop, None


def iter_scopes(gm: GraphModule) -> Iterator[Scope]:
    """The top graph and, recursively, each higher-order-op body it calls."""
    root = Scope(gm)
    stack = [root]
    while stack:
        scope = stack.pop(0)
        yield scope
        for node in scope.gm.graph.nodes:
            if node.op != "call_function" or not node.args:
                continue
            body = node.args[0]
            if not (isinstance(body, Node) and body.op == "get_attr"):
                continue
            sub = getattr(scope.gm, body.target, None)
            if not isinstance(sub, GraphModule):
                continue
            placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
            operands = list(node.args[1:])
            if len(operands) != len(placeholders):
                log.debug("higher-order op %s: %d operands for %d placeholders; not entered",
                          node.name, len(operands), len(placeholders))
                continue
            stack.append(Scope(sub, f"{scope.name}{body.target}.", scope, dict(zip(placeholders, operands)), node))


def _is_weight(scope: Scope, node: object, trainable: bool) -> bool:
    """A 2-D graph input (a parameter) whose requires_grad matches ``trainable``."""
    outer = scope.resolve(node)
    if not isinstance(outer, Node) or outer.op not in ("placeholder", "get_attr"):
        return False
    val = ops.example_value(node)
    if val is None:
        val = ops.example_value(outer)
    return isinstance(val, torch.Tensor) and val.dim() == 2 and bool(val.requires_grad) == trainable


def weight_path(scope: Scope, weight: Node) -> str:
    """The parameter's path in the user's model (``model.layers.0.q_proj.base_layer.weight``)."""
    outer = scope.resolve(weight)
    if isinstance(outer, Node):
        source = dynamo_source_name(outer) if outer.op == "placeholder" else None
        if source:
            path = source_to_path(source)
            if path:
                return path
        if outer.op == "get_attr":
            return str(outer.target)
        return outer.name
    return weight.name


def _linear_features(call: ops.LinearCall) -> tuple[int, int]:
    w = ops.example_value(call.weight)
    out_f, in_f = (w.shape[1], w.shape[0]) if call.weight_transposed else (w.shape[0], w.shape[1])
    return int(in_f), int(out_f)


def _scale_value(value: object) -> float | None:
    return float(value) if ops.is_scalar(value) else None


def _match_branch(scope: Scope, node: object, x: Node) -> LoraBranch | None:
    """``node`` as ``scale * B(A(dropout(x)))`` on the same input ``x`` (scale on either side or absent)."""
    if not isinstance(node, Node):
        return None
    scale: float | None = 1.0
    scale_node, inner = None, node
    if ops.is_mul(node):
        lhs, rhs = node.args
        if ops.is_scalar_like(lhs) and not ops.is_scalar_like(rhs) and isinstance(rhs, Node):
            scale, scale_node, inner = _scale_value(lhs), node, rhs
        elif ops.is_scalar_like(rhs) and not ops.is_scalar_like(lhs) and isinstance(lhs, Node):
            scale, scale_node, inner = _scale_value(rhs), node, lhs
        else:
            return None
    b = ops.as_linear(ops.strip_passthrough(inner))
    if b is None or b.bias is not None or not _is_weight(scope, b.weight, trainable=True):
        return None
    a_out = b.input
    if ops.is_mul(a_out) and scale_node is None:  # scale between A and B
        lhs, rhs = a_out.args
        if ops.is_scalar_like(rhs) and isinstance(lhs, Node) and not ops.is_scalar_like(lhs):
            scale, scale_node, a_out = _scale_value(rhs), a_out, lhs
        elif ops.is_scalar_like(lhs) and isinstance(rhs, Node) and not ops.is_scalar_like(rhs):
            scale, scale_node, a_out = _scale_value(lhs), a_out, rhs
    a = ops.as_linear(ops.strip_passthrough(a_out))
    if a is None or a.bias is not None or not _is_weight(scope, a.weight, trainable=True):
        return None
    dropout = None
    cur = a.input
    while isinstance(cur, Node) and cur is not x and (ops.is_dtype_cast(cur) or ops.is_dropout(cur)):
        if ops.is_dropout(cur):
            dropout = cur
        cur = cur.args[0]
    if cur is not x:
        return None
    return LoraBranch(a=a, b=b, scale=scale, scale_node=scale_node, dropout=dropout, output=node)


def _frozen_channels(scope: Scope, node: object, out_features: int) -> bool:
    """``node`` is a frozen ``[out_features]`` graph input (a bias or per-channel scale), perhaps cast."""
    src = node
    while isinstance(src, Node) and ops.is_dtype_cast(src):
        src = src.args[0]
    if not isinstance(src, Node) or not _is_weight_like_frozen(scope, src):
        return False
    val = ops.example_value(node)
    return (isinstance(val, torch.Tensor) and val.dim() == 1 and isinstance(val.shape[0], int)
            and int(val.shape[0]) == out_features and not val.requires_grad)


def _frozen_scalar(value: object) -> bool:
    """A Python number, or a graph scalar (0-d tensor, SymFloat) that takes no gradient."""
    if not ops.is_scalar_like(value):
        return False
    val = ops.example_value(value)
    return not (isinstance(val, torch.Tensor) and val.requires_grad)


def _post_op(scope: Scope, node: Node, cur: Node, out_features: int) -> PostOp | None:
    """``node`` (the one reader of ``cur``) as a bias add or scale of ``cur``'s channels."""
    if not (ops.is_add(node) or ops.is_mul(node)) or list(node.args).count(cur) != 1:
        return None
    other = node.args[1] if node.args[0] is cur else node.args[0]
    if _frozen_channels(scope, other, out_features):
        return PostOp(node, "bias" if ops.is_add(node) else "scale", other, vector=True)
    if ops.is_mul(node) and _frozen_scalar(other):
        return PostOp(node, "scale", other)
    return None


@dataclass
class _Walk:
    """What follows a frozen linear's output: its post ops, LoRA sums, and what stopped the walk."""

    post: list[PostOp]
    branches: list[LoraBranch]
    adds: list[Node]
    output: Node
    stop: Node | None  # the node that stopped the walk (None: the value is read by nothing)
    shared: bool = False  # ``stop`` is the last node taken, read by several ops


def _follow(scope: Scope, call: ops.LinearCall, x: Node) -> _Walk:
    """Walk from the frozen product through post ops (before the first LoRA sum), LoRA sums and casts."""
    out_f = _linear_features(call)[1]
    walk = _Walk([], [], [], call.node, None)
    cur: Node = call.node
    while True:
        users = list(cur.users)
        if len(users) != 1:
            walk.stop, walk.shared = (cur, True) if users else (None, False)
            break
        user = users[0]
        if ops.is_dtype_cast(user):
            if not walk.branches:
                walk.post.append(PostOp(user, "cast"))
            cur = user
            continue
        if not walk.branches:
            post = _post_op(scope, user, cur, out_f)
            if post is not None:
                walk.post.append(post)
                cur = user
                continue
        if not ops.is_add(user):
            walk.stop = user
            break
        other = user.args[1] if user.args[0] is cur else user.args[0]
        branch = _match_branch(scope, other, x) or (
            _match_branch(scope, other, call.input) if x is not call.input else None
        )
        if branch is None:
            walk.stop = user
            break
        walk.branches.append(branch)
        walk.adds.append(user)
        cur = user
        walk.output = cur
    return walk


def _unit_input(call: ops.LinearCall) -> Node:
    return ops.strip_passthrough(call.input) if ops.is_dtype_cast(call.input) else call.input


def _match_unit(scope: Scope, call: ops.LinearCall) -> LoraUnit | None:
    if not _is_weight(scope, call.weight, trainable=False):
        return None
    if call.bias is not None and not _is_weight_like_frozen(scope, call.bias):
        return None
    x = _unit_input(call)
    walk = _follow(scope, call, x)
    if not walk.branches:
        return None
    output = walk.output
    # trailing casts after the last add belong to the unit
    while len(output.users) == 1 and ops.is_dtype_cast(next(iter(output.users))):
        output = next(iter(output.users))
    in_f, out_f = _linear_features(call)
    fqn = module_of_param(weight_path(scope, call.weight))
    return LoraUnit(fqn=fqn, scope=scope, base=call, input=x, branches=walk.branches, adds=walk.adds,
                    output=output, in_features=in_f, out_features=out_f, post=walk.post)


def _is_weight_like_frozen(scope: Scope, node: Node) -> bool:
    outer = scope.resolve(node)
    val = ops.example_value(node)
    return (isinstance(outer, Node) and outer.op in ("placeholder", "get_attr")
            and isinstance(val, torch.Tensor) and not val.requires_grad)


def find_lora_units(gm: GraphModule) -> list[LoraUnit]:
    """Every linear+LoRA unit in ``gm`` and the HOP bodies it calls, in graph order."""
    units: list[LoraUnit] = []
    for scope in iter_scopes(gm):
        for node in scope.gm.graph.nodes:
            call = ops.as_linear(node)
            if call is None:
                continue
            unit = _match_unit(scope, call)
            if unit is not None:
                units.append(unit)
    _dedupe_names(units)
    log.debug("units: matched %d linear+LoRA units", len(units))
    return units


# ---- frozen linears that meet a LoRA branch but are no unit: say which node stopped the matcher ----

_AHEAD_DEPTH = 8  # ops searched downstream of a frozen product for a LoRA sum on its input


def _op_name(node: Node) -> str:
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def _lora_sum_ahead(scope: Scope, call: ops.LinearCall, x: Node) -> Node | None:
    """The nearest add within a few ops downstream of the frozen product that sums a LoRA branch
    on the linear's own input (not looking through other linears)."""
    inputs = [x] if x is call.input else [x, call.input]
    frontier, seen = [call.node], {call.node}
    for _ in range(_AHEAD_DEPTH):
        nxt: list[Node] = []
        for cur in frontier:
            for user in cur.users:
                if user in seen:
                    continue
                seen.add(user)
                if ops.is_add(user) and any(
                        isinstance(i, Node) and _match_branch(scope, other, i) is not None
                        for other in user.args if other is not cur for i in inputs):
                    return user
                if ops.as_linear(user) is None:
                    nxt.append(user)
        frontier = nxt
    return None


def _why_not(scope: Scope, call: ops.LinearCall, walk: _Walk, lora_sum: Node) -> tuple[str, Node]:
    """The reason a frozen linear meeting ``lora_sum`` is no unit, and the node that stopped the matcher."""
    tail = "; it is not a linear+LoRA unit, so it runs dense"
    if call.bias is not None and not _is_weight_like_frozen(scope, call.bias):
        return f"its bias `{call.bias.name}` is not a frozen graph input{tail}", call.bias
    stop = walk.stop
    if stop is None:  # not reachable: a LoRA sum ahead means the walk met some node
        return f"frozen linear whose output reaches the LoRA sum `{lora_sum.name}` by a path the matcher " \
               f"does not follow{tail}", lora_sum
    if walk.shared:
        others = ", ".join(f"`{u.name}`" for u in stop.users)
        return (f"frozen linear whose value `{stop.name}` is read by {len(stop.users)} ops ({others}) before "
                f"the LoRA sum `{lora_sum.name}`{tail}"), stop
    what = f"`{stop.name}` ({_op_name(stop)})"
    if ops.is_add(stop) or ops.is_mul(stop):
        what += ", whose other operand is not a frozen [out] vector or a scalar"
    return (f"frozen linear whose output reaches the LoRA sum `{lora_sum.name}` through {what}; only bias "
            f"adds, per-channel scales and dtype casts may sit between the base product and the LoRA sum"
            f"{tail}"), stop


def detect_unmatched(gm: GraphModule, units: list[LoraUnit]) -> list[tuple[str, str, str]]:
    """Frozen linears whose output meets a trainable LoRA branch on their input but that are no unit.

    Why: such a layer (``relu(x @ W.T) + lora(x)``, a base product read twice, a trainable bias)
    runs dense, and a user must see that in the report's ``skipped`` with the node that stopped the
    matcher, rather than find the layer's group silently missing. Returns ``(name, reason, node)``.
    """
    matched = {u.base.node for u in units}
    found: list[tuple[str, str, str]] = []
    for scope in iter_scopes(gm):
        for node in scope.gm.graph.nodes:
            call = ops.as_linear(node)
            if call is None or call.node in matched or not _is_weight(scope, call.weight, trainable=False):
                continue
            x = _unit_input(call)
            lora_sum = _lora_sum_ahead(scope, call, x)
            if lora_sum is None:
                continue
            walk = _follow(scope, call, x)
            if walk.branches and (call.bias is None or _is_weight_like_frozen(scope, call.bias)):
                continue  # a unit (one the caller dropped, e.g. as QLoRA/DoRA)
            reason, stop = _why_not(scope, call, walk, lora_sum)
            path = weight_path(scope, call.weight)
            found.append((module_of_param(path) or path or call.node.name, reason, stop.name))
    if found:
        log.debug("units: %d frozen linears meet a LoRA branch but are no unit", len(found))
    return found


def _dedupe_names(units: list[LoraUnit]) -> None:
    """Two units with one module path (a module called twice) get ``#1``, ``#2`` suffixes."""
    seen: dict[str, int] = {}
    for unit in units:
        seen[unit.fqn] = seen.get(unit.fqn, 0) + 1
    counts: dict[str, int] = {}
    for unit in units:
        if seen[unit.fqn] > 1:
            counts[unit.fqn] = counts.get(unit.fqn, 0) + 1
            unit.fqn = f"{unit.fqn}#{counts[unit.fqn]}"
