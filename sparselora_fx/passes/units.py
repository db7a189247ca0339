"""Find linear+LoRA units: a frozen base linear whose output is summed with ``s * B(A(drop(x)))``.

This is the first pass. It works on the Dynamo graph (torch-level ops, before autograd), recurses
into higher-order-op bodies (activation checkpointing's ``wrap_body_*``), and names each unit by
the module path a user sees (``model.layers.3.mlp.gate_proj``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

import torch
from torch.fx import GraphModule, Node

from .._compat import dynamo_source_name
from ..names import module_of_param, source_to_path
from . import graph_ops as ops

if TYPE_CHECKING:  # groups.py imports this module
    from .groups import Group

log = logging.getLogger("sparselora_fx")


@dataclass
class Scope:
    """A graph plus how its placeholders map to the enclosing graph (for HOP bodies)."""

    gm: GraphModule
    name: str = ""
    parent: "Scope | None" = None
    outer_args: dict[Node, object] = field(default_factory=dict)

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
class LoraUnit:
    """A frozen linear plus its LoRA branches, as found in one graph scope."""

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
                        out_features=width,
                        part=FusedPart(parent, name, offset, width, block, period, piece))
        parent.parts[key] = unit
    return unit


def expand_fused(units: list[LoraUnit], groups: list[Group]) -> list[LoraUnit]:
    """``units`` with each fused projection that has a grouped part replaced by its parts.

    Why: the report, the plan and the rewrite speak of units with one role each; a fused qkv_proj
    is three (q, k, v). Parts take the parent's name plus ``[role]``.
    """
    grouped = {id(u) for g in groups for u in g.units}
    out: list[LoraUnit] = []
    for unit in units:
        parts = sorted(unit.parts.values(), key=lambda u: u.part.offset)  # type: ignore[union-attr]
        if not any(id(p) in grouped for p in parts):
            out.append(unit)
            continue
        for p in parts:
            if p.role:
                p.fqn = f"{unit.fqn}[{p.role}]"
        out.extend(parts)
    return out


SPLIT_FNS = {torch.chunk, torch.split, torch.tensor_split}
SPLIT_METHODS = {"chunk", "split", "tensor_split", "split_with_sizes"}


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
    if ops.is_call(src, SPLIT_FNS, SPLIT_METHODS) and isinstance(idx, int):
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
            stack.append(Scope(sub, f"{scope.name}{body.target}.", scope, dict(zip(placeholders, operands))))


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


def _match_unit(scope: Scope, call: ops.LinearCall) -> LoraUnit | None:
    if not _is_weight(scope, call.weight, trainable=False):
        return None
    if call.bias is not None and not _is_weight_like_frozen(scope, call.bias):
        return None
    x = ops.strip_passthrough(call.input) if ops.is_dtype_cast(call.input) else call.input
    branches: list[LoraBranch] = []
    adds: list[Node] = []
    cur: Node = call.node
    output = cur
    while True:
        users = list(cur.users)
        if len(users) != 1:
            break
        user = users[0]
        if ops.is_dtype_cast(user):
            cur = user
            continue
        if not ops.is_add(user):
            break
        other = user.args[1] if user.args[0] is cur else user.args[0]
        branch = _match_branch(scope, other, x) or (
            _match_branch(scope, other, call.input) if x is not call.input else None
        )
        if branch is None:
            break
        branches.append(branch)
        adds.append(user)
        cur = user
        output = cur
    if not branches:
        return None
    # trailing casts after the last add belong to the unit
    while len(output.users) == 1 and ops.is_dtype_cast(next(iter(output.users))):
        output = next(iter(output.users))
    in_f, out_f = _linear_features(call)
    fqn = module_of_param(weight_path(scope, call.weight))
    return LoraUnit(fqn=fqn, scope=scope, base=call, input=x, branches=branches, adds=adds,
                    output=output, in_features=in_f, out_features=out_f)


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


# ---- layers we must not sparsify: QLoRA (quantized base weights) and DoRA ------------------------

QLORA_REASON = ("QLoRA: the frozen base weight is quantized ({what}); the channel-gather ops need a "
                "floating-point weight, so this layer runs dense (its LoRA branch trains as usual)")
DORA_REASON = ("DoRA (PEFT use_dora=True, lora_magnitude_vector): the output is rescaled by "
               "magnitude / ||W + s*B@A|| over the full weight, so dropping channels would change "
               "the adapter itself; this layer runs dense. Use plain LoRA (use_dora=False) to sparsify it")
_DORA_LOCAL = (" (a graph break inside PEFT's DoRA layer hides its module path here; "
               "sparselora_fx.integrations.transformers.unsupported_modules(model) lists these layers by name)")
_NORM_FNS = {torch.norm, torch.linalg.norm, torch.linalg.vector_norm, torch.Tensor.norm}
_NORM_METHODS = {"norm"}
_DIV_FNS = {torch.div, torch.true_divide, __import__("operator").truediv}
_DIV_METHODS = {"div", "div_", "true_divide"}
_SHAPE_METHODS = {"detach", "view", "reshape", "contiguous", "unsqueeze"}


def _is_quant_op(node: Node) -> bool:
    """A call into bitsandbytes (its torch.ops namespace or its Python functions)."""
    if node.op != "call_function":
        return False
    target = node.target
    if getattr(target, "namespace", None) == "bitsandbytes":  # OpOverload / OpOverloadPacket
        return True
    return str(getattr(target, "__module__", "") or "").startswith("bitsandbytes")


def _quantized_source(scope: Scope, node: object, depth: int = 4) -> Node | None:
    """A non-floating-point graph input (a packed 4/8-bit weight) feeding ``node`` within ``depth`` ops."""
    frontier, seen = [node], set()
    for _ in range(depth + 1):
        nxt: list[object] = []
        for cur in frontier:
            if not isinstance(cur, Node) or cur in seen:
                continue
            seen.add(cur)
            if cur.op in ("placeholder", "get_attr"):
                val = ops.example_value(cur)
                if val is None:
                    val = ops.example_value(scope.resolve(cur))
                if isinstance(val, torch.Tensor) and val.dim() >= 1 and not val.is_floating_point():
                    return cur
                continue
            nxt.extend(a for a in cur.all_input_nodes)
        frontier = nxt
    return None


def _output_has_lora(scope: Scope, out: Node, x: object) -> bool:
    """``out`` (through dtype casts) is summed with a LoRA branch on ``x``."""
    inputs = [x]
    if isinstance(x, Node) and ops.is_dtype_cast(x):
        inputs.append(ops.strip_passthrough(x))
    cur = out
    while True:
        users = list(cur.users)
        if len(users) != 1:
            return False
        user = users[0]
        if ops.is_dtype_cast(user):
            cur = user
            continue
        if not ops.is_add(user):
            return False
        other = user.args[1] if user.args[0] is cur else user.args[0]
        return any(isinstance(i, Node) and _match_branch(scope, other, i) is not None for i in inputs)


def _path_name(scope: Scope, node: Node) -> str:
    """The module path of a (packed) weight; bitsandbytes' ``weight.quant_state.*`` inputs name their weight's module."""
    path = weight_path(scope, node)
    if ".weight." in f"{path}.":
        path = path[: f"{path}.".index(".weight.")] + ".weight"
    return module_of_param(path) or path or node.name


def _qlora_layers(scope: Scope) -> Iterator[tuple[str, str]]:
    for node in scope.gm.graph.nodes:
        if _is_quant_op(node):
            x = next((a for a in node.args if isinstance(a, Node)), None)
            packed = _quantized_source(scope, node)
            what = f"bitsandbytes op {getattr(node.target, '__name__', node.target)}"
        else:
            call = ops.as_linear(node)
            if call is None or _is_weight(scope, call.weight, trainable=False):
                continue
            x, packed = call.input, _quantized_source(scope, call.weight)
            if packed is None:
                continue
            what = f"{ops.example_value(packed).dtype} weight dequantized in the graph"
        if x is None or not _output_has_lora(scope, node, x):
            continue
        name = _path_name(scope, packed) if packed is not None else f"{scope.name}{node.name}"
        yield name, QLORA_REASON.format(what=what)


def _is_norm(node: object) -> bool:
    """A norm, possibly behind ``detach``/views/casts (PEFT detaches DoRA's weight norm)."""
    while isinstance(node, Node) and (ops.is_call(node, {torch.detach}, _SHAPE_METHODS) or ops.is_dtype_cast(node)):
        node = node.args[0]
    return ops.is_call(node, _NORM_FNS, _NORM_METHODS)


def _dora_layers(scope: Scope) -> Iterator[tuple[str, str]]:
    """DoRA magnitudes: a source path through ``lora_magnitude_vector``, or a trainable 1-D input divided by a norm."""
    for node in scope.gm.graph.nodes:
        if node.op not in ("placeholder", "get_attr"):
            continue
        path = weight_path(scope, node)
        by_name = "lora_magnitude_vector" in path
        val = ops.example_value(node)
        by_shape = False
        if isinstance(val, torch.Tensor) and val.dim() == 1 and val.requires_grad:
            by_shape = any(ops.is_call(u, _DIV_FNS, _DIV_METHODS) and u.args[0] is node and _is_norm(u.args[1])
                           for u in node.users)
        if not (by_name or by_shape):
            continue
        if by_name:
            yield module_of_param(path), DORA_REASON
        else:  # a graph break inside PEFT's DoRA layer: only the frame-local name is left
            yield f"<DoRA layer, graph input {path or node.name!r}>", DORA_REASON + _DORA_LOCAL


def detect_unsupported(gm: GraphModule) -> list[tuple[str, str]]:
    """LoRA layers in ``gm`` (and its HOP bodies) that must stay dense, as ``(name, reason)``.

    Why: a QLoRA base (4/8-bit packed weight, bitsandbytes matmul or an in-graph dequantize) has
    no float weight to gather channels from, and DoRA rescales by a norm over the whole adapted
    weight; neither may be sparsified, and a user must see why in the report's ``skipped`` rather
    than find them silently dense. Names are module paths where the graph still knows them.
    """
    found: list[tuple[str, str]] = []
    seen: set[str] = set()
    for scope in iter_scopes(gm):
        for name, reason in [*_qlora_layers(scope), *_dora_layers(scope)]:
            if name not in seen:
                seen.add(name)
                found.append((name, reason))
    if found:
        log.debug("units: %d layers must stay dense (QLoRA/DoRA)", len(found))
    return found
