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
ADDMM_FNS = {torch.addmm}
ADD_FNS = {operator.add, operator.iadd, torch.add}
ADD_METHODS = {"add", "add_", "__add__", "__iadd__"}
MUL_FNS = {operator.mul, operator.imul, torch.mul}
MUL_METHODS = {"mul", "mul_", "__mul__"}
DIV_FNS = {operator.truediv, operator.itruediv, torch.div, torch.true_divide}
DIV_METHODS = {"div", "div_", "true_divide", "__truediv__"}
NEG_FNS = {operator.neg, torch.neg}
NEG_METHODS = {"neg", "__neg__"}
DROPOUT_FNS = {F.dropout, torch.dropout, torch.nn.functional.dropout}
CAST_METHODS = {"to", "type", "float", "half", "bfloat16", "double", "type_as"}
CONTIGUOUS_METHODS = {"contiguous", "clone"}
DETACH_FNS = {torch.detach}
DETACH_METHODS = {"detach"}

# Shape ops. Conv1D's matcher (``as_linear``) keeps to RESHAPE_*, the spelling transformers uses
# and the rewrite's token split (which copies and skips those views) was written for.
RESHAPE_FNS = {torch.reshape}
RESHAPE_METHODS = {"view", "reshape"}
VIEW_FNS = RESHAPE_FNS | {torch.flatten, torch.unflatten}
VIEW_METHODS = RESHAPE_METHODS | {"flatten", "unflatten"}
UNSQUEEZE_FNS = {torch.unsqueeze}
UNSQUEEZE_METHODS = {"unsqueeze"}
EXPAND_METHODS = {"expand"}
REPEAT_INTERLEAVE_FNS = {torch.repeat_interleave}
REPEAT_INTERLEAVE_METHODS = {"repeat_interleave"}
TRANSPOSE_FNS = {torch.transpose, torch.permute, torch.swapaxes, torch.swapdims}
TRANSPOSE_METHODS = {"t", "transpose", "permute", "swapaxes", "swapdims"}
CAT_FNS = {torch.cat, torch.concat, torch.concatenate}
STACK_FNS = {torch.stack}
CHUNK_FNS = {torch.chunk}
CHUNK_METHODS = {"chunk"}
# Splits whose pieces keep the split dim (``units.last_dim_piece`` reads their bounds); unbind
# drops the dim, so only the WITH_UNBIND sets, which ask "is this a piece of a split", include it.
SPLIT_FNS = {torch.chunk, torch.split, torch.tensor_split}
SPLIT_METHODS = {"chunk", "split", "tensor_split", "split_with_sizes"}
SPLIT_FNS_WITH_UNBIND = SPLIT_FNS | {torch.unbind}
SPLIT_METHODS_WITH_UNBIND = SPLIT_METHODS | {"unbind"}
EMPTY_CONST_FNS = {torch.tensor, torch.empty, torch.zeros}
MASKED_FILL_FNS = {torch.masked_fill}
MASKED_FILL_METHODS = {"masked_fill"}

# Reductions and norms. REDUCE_* are the last-dim statistics a per-head norm is built from;
# VECTOR_NORM_* the norms DoRA divides its magnitude by; NORM_LAYER_FNS the normalisation layers.
REDUCE_FNS = {torch.mean, torch.sum, torch.var, torch.std, torch.norm, torch.linalg.vector_norm, torch.amax}
REDUCE_METHODS = {"mean", "sum", "var", "std", "norm", "amax"}
VECTOR_NORM_FNS = {torch.norm, torch.linalg.norm, torch.linalg.vector_norm, torch.Tensor.norm}
VECTOR_NORM_METHODS = {"norm"}
NORM_LAYER_FNS = {F.layer_norm, F.rms_norm, F.group_norm}

SOFTMAX_FNS = {F.softmax, torch.softmax, torch.nn.functional.softmax}
SOFTMAX_METHODS = {"softmax"}
# Logit soft-capping c * tanh(s / c) (Gemma2) between the score matmul and the softmax. Q/K stays
# sparse under it: the criterion bounds the error dropped head dims add to the raw logit s, and
# s -> c * tanh(s / c) is monotone and 1-Lipschitz, so the capped logit's error is never larger.
SOFTCAP_FNS = {torch.tanh}
SOFTCAP_METHODS = {"tanh"}

# Ops an activation written out as a formula may use (``0.5 * x * (1 + tanh(c * (x + a * x**3))))``);
# groups.formula_activation evaluates the formula on a probe to name the activation.
FORMULA_FNS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow,
               torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.pow, torch.tanh, torch.sigmoid,
               torch.exp, torch.erf, torch.sqrt, torch.rsqrt, torch.square}
FORMULA_METHODS = {"add", "sub", "mul", "div", "neg", "pow", "tanh", "sigmoid", "exp", "erf", "sqrt", "rsqrt",
                   "square", "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__",
                   "__truediv__", "__pow__", "__neg__"}

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


def _conv1d(node: Node) -> LinearCall | None:
    """transformers' ``Conv1D``: ``addmm(b, x.view(-1, in), W).view(*x.shape[:-1], out)``, W stored [in, out]."""
    if not is_call(node, RESHAPE_FNS, RESHAPE_METHODS) or not node.args:
        return None
    mm = node.args[0]
    if not is_call(mm, ADDMM_FNS) or len(mm.args) != 3 or mm.kwargs or len(mm.users) != 1:
        return None
    bias, flat, w = mm.args
    if not (isinstance(flat, Node) and isinstance(w, Node) and is_call(flat, RESHAPE_FNS, RESHAPE_METHODS)):
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
