"""Every torch-level op the passes recognise, in one table.

Dynamo graphs spell the same computation many ways (``F.linear``, ``x @ W.T``, ``torch.matmul(x,
W.t())``, ``result += ...``, ``.to(dtype)``); the passes ask this module, never compare targets
themselves, so a new spelling is one line here.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx import Node

LINEAR_FNS = {F.linear}  # the same object as torch._C._nn.linear, which Dynamo records
MATMUL_FNS = {torch.matmul, operator.matmul, torch.mm, torch.bmm}
MATMUL_METHODS = {"matmul", "mm", "__matmul__"}
ADD_FNS = {operator.add, operator.iadd, torch.add}
ADD_METHODS = {"add", "add_", "__add__", "__iadd__"}
MUL_FNS = {operator.mul, operator.imul, torch.mul}
MUL_METHODS = {"mul", "mul_", "__mul__"}
DROPOUT_FNS = {F.dropout, torch.dropout, torch.nn.functional.dropout}
CAST_METHODS = {"to", "type", "float", "half", "bfloat16", "double", "type_as"}
CONTIGUOUS_METHODS = {"contiguous", "clone"}
TRANSPOSE_METHODS = {"t", "transpose", "permute"}

# Graph spellings of the activations the selection ops score (runtime.selection.ACTIVATIONS); each
# maps 0 to 0, so padding adds nothing to a score. Others (sigmoid, tanh) leave the MLP ungrouped.
ACTIVATIONS: dict[Any, str] = {
    F.silu: "silu",
    torch.nn.functional.silu: "silu",
    F.relu: "relu",
    torch.relu: "relu",
    F.gelu: "gelu",
}
ACTIVATION_METHODS = {"relu": "relu"}

SDPA_FNS = {F.scaled_dot_product_attention}


def is_call(node: Any, fns: set[Any] = frozenset(), methods: set[str] = frozenset()) -> bool:
    """True when ``node`` calls one of ``fns`` (call_function) or ``methods`` (call_method)."""
    if not isinstance(node, Node):
        return False
    if node.op == "call_function":
        return node.target in fns
    if node.op == "call_method":
        return node.target in methods
    return False


def example_value(node: Any) -> Any:
    """The fake tensor Dynamo recorded for ``node`` (None for non-nodes and missing meta)."""
    if not isinstance(node, Node):
        return None
    return node.meta.get("example_value", node.meta.get("val"))


def is_add(node: Any) -> bool:
    return is_call(node, ADD_FNS, ADD_METHODS) and len(node.args) == 2 and "alpha" not in node.kwargs


def is_mul(node: Any) -> bool:
    return is_call(node, MUL_FNS, MUL_METHODS) and len(node.args) == 2


def is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_scalar_like(value: Any) -> bool:
    """A Python number, or a graph scalar (``.item()`` under ``dynamic=True``, a 0-d tensor)."""
    if is_scalar(value):
        return True
    if not isinstance(value, Node):
        return False
    val = example_value(value)
    if isinstance(val, torch.Tensor):
        return val.dim() == 0
    return isinstance(val, (torch.SymFloat, torch.SymInt, float, int)) and not isinstance(val, bool)


def is_dtype_cast(node: Any) -> bool:
    """A ``.to(dtype)``-style cast that keeps shape and device (so channels map one to one)."""
    if not is_call(node, methods=CAST_METHODS):
        return False
    extra = list(node.args[1:]) + list(node.kwargs.values())
    return all(isinstance(a, (torch.dtype, torch.device, bool, Node)) or a is None for a in extra) and (
        node.target != "type_as" or isinstance(node.args[1], Node)
    )


def is_dropout(node: Any) -> bool:
    return is_call(node, DROPOUT_FNS)


def strip_passthrough(node: Any) -> Any:
    """Follow casts, dropout and ``contiguous`` back to the tensor they pass through."""
    while isinstance(node, Node) and (
        is_dtype_cast(node) or is_dropout(node) or is_call(node, methods=CONTIGUOUS_METHODS)
    ):
        node = node.args[0]
    return node


@dataclass(frozen=True)
class LinearCall:
    """One ``y = x W^T (+ b)`` application, whatever its spelling.

    ``weight_transposed`` is True when the weight node is stored ``[in, out]`` (``x @ W`` with a
    weight kept pre-transposed, transformers' ``Conv1D``), False for the nn.Linear layout
    ``[out, in]``. ``inner`` are the nodes between ``input`` and ``node`` that belong to the
    spelling (Conv1D's ``x.view(-1, in)`` and ``addmm``): they die with ``node`` when it is rewritten.
    """

    node: Node
    input: Node
    weight: Node
    bias: Node | None
    weight_transposed: bool
    inner: tuple[Node, ...] = ()

    @property
    def reader(self) -> Node:
        """The node that reads ``input`` (its first argument): ``node`` or Conv1D's flattening view."""
        return self.inner[0] if self.inner else self.node


def _transpose_source(node: Any) -> Node | None:
    """If ``node`` is a 2-D transpose of a tensor (``W.T``, ``W.t()``, ``W.transpose(0, 1)``), that tensor."""
    if not isinstance(node, Node):
        return None
    if node.op == "call_function" and node.target is getattr and node.args[1] in ("T", "mT"):
        return node.args[0]
    if node.op == "call_function" and node.target in (torch.t,):
        return node.args[0]
    if node.op == "call_method" and node.target == "t":
        return node.args[0]
    if node.op in ("call_method", "call_function") and node.target in ("transpose", torch.transpose):
        dims = tuple(node.args[1:3])
        if sorted(d % 2 for d in dims if isinstance(d, int)) == [0, 1]:
            return node.args[0]
    if node.op == "call_method" and node.target == "permute":
        dims = node.args[1:] if not isinstance(node.args[1], (tuple, list)) else node.args[1]
        if tuple(dims) == (1, 0):
            return node.args[0]
    return None


VIEW_METHODS = {"view", "reshape"}
ADDMM_FNS = {torch.addmm}


def _conv1d(node: Node) -> LinearCall | None:
    """transformers' ``Conv1D``: ``addmm(b, x.view(-1, in), W).view(*x.shape[:-1], out)``, W stored [in, out]."""
    if not is_call(node, {torch.reshape}, VIEW_METHODS) or not node.args:
        return None
    mm = node.args[0]
    if not is_call(mm, ADDMM_FNS) or len(mm.args) != 3 or mm.kwargs or len(mm.users) != 1:
        return None
    bias, flat, w = mm.args
    if not (isinstance(flat, Node) and isinstance(w, Node) and is_call(flat, {torch.reshape}, VIEW_METHODS)):
        return None
    x = flat.args[0] if flat.args else None
    x_val, w_val, out_val = example_value(x), example_value(w), example_value(node)
    if not all(isinstance(v, torch.Tensor) for v in (x_val, w_val, out_val)) or w_val.dim() != 2:
        return None
    lead_out, lead_x = out_val.shape[:-1], x_val.shape[:-1]
    if len(flat.users) != 1 or x_val.dim() < 2 or len(lead_out) != len(lead_x) or any(
            str(a) != str(b) for a, b in zip(lead_out, lead_x)):
        return None  # only the flatten -> addmm -> unflatten round trip keeps the token dims
    if str(x_val.shape[-1]) != str(w_val.shape[0]) or str(out_val.shape[-1]) != str(w_val.shape[1]):
        return None
    b = bias if isinstance(bias, Node) else None
    b_val = example_value(b)
    if b is None or not isinstance(b_val, torch.Tensor) or b_val.dim() != 1:
        return None  # Conv1D always has a [out] bias; anything else is some other addmm
    return LinearCall(node, x, w, b, True, (flat, mm))


def as_linear(node: Any) -> LinearCall | None:
    """Recognise a linear application; None for anything else (including batched matmuls of activations)."""
    if not isinstance(node, Node):
        return None
    conv = _conv1d(node)
    if conv is not None:
        return conv
    if is_call(node, LINEAR_FNS):
        args = list(node.args) + [None] * 3
        x = args[0]
        w = node.kwargs.get("weight", args[1])
        b = node.kwargs.get("bias", args[2])
        if isinstance(w, Node):
            return LinearCall(node, x, w, b if isinstance(b, Node) else None, False)
        return None
    if is_call(node, MATMUL_FNS, MATMUL_METHODS) and len(node.args) == 2:
        x, rhs = node.args
        if not isinstance(x, Node) or not isinstance(rhs, Node):
            return None
        rhs_val = example_value(rhs)
        if not isinstance(rhs_val, torch.Tensor) or rhs_val.dim() != 2:
            return None
        source = _transpose_source(rhs)
        if source is not None:
            return LinearCall(node, x, source, None, False)
        return LinearCall(node, x, rhs, None, True)
    return None
