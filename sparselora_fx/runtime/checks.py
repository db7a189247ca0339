"""Input checks of the gather-linear ops, shared by their eager kernels, fake kernels and Triton bodies.

Why a module of its own: the public ops (``runtime/ops.py``) and the Triton bodies that replace them in
compiled CUDA graphs (``passes/lower.py``) must refuse the same inputs with the same words; one home
keeps them from drifting and keeps the two modules free of each other.
"""

from __future__ import annotations

from typing import Any, NoReturn, Optional

import torch
from torch import Tensor

from sparselora_fx.errors import SparseLoRAError

NAMESPACE = "sparselora"
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)



def fail(op: str, what: str, fix: str) -> NoReturn:
    raise SparseLoRAError(f"{NAMESPACE}::{op}: {what}. {fix}")


def check_weight_idx(op: str, x: Tensor, weight: Tensor, idx: Tensor, x_name: str = "x") -> None:
    """Checks shared by every op; run by the real and the fake kernels alike."""
    if weight.dim() != 2:
        fail(op, f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}",
              "Pass the frozen nn.Linear weight itself.")
    if x.dim() < 1:
        fail(op, f"{x_name} must have at least one dimension, got a scalar",
              f"Pass {x_name} as [..., features].")
    if x.dtype not in FLOAT_DTYPES:
        fail(op, f"{x_name} has dtype {x.dtype}; supported: fp16, bf16, fp32, fp64",
              f"Cast {x_name} to a floating dtype.")
    if x.dtype != weight.dtype:
        fail(op, f"{x_name} is {x.dtype} but weight is {weight.dtype}",
              f"Cast {x_name} to the weight's dtype before the call "
              "(autocast does not cast custom ops).")
    if x.device != weight.device:
        fail(op, f"{x_name} is on {x.device} but weight is on {weight.device}",
              f"Move {x_name} and weight to the same device.")
    if idx.dtype != torch.int64:
        fail(op, f"idx has dtype {idx.dtype}, expected torch.int64",
              "Pass channel indices as int64 (e.g. the indices of torch.topk).")
    if idx.dim() != 1:
        fail(op, f"idx must be 1-D [k], got shape {tuple(idx.shape)}",
              "Pass one flat list of channel indices per weight.")
    if idx.device != weight.device:
        fail(op, f"idx is on {idx.device} but weight is on {weight.device}",
              "Build idx on the weight's device (e.g. idx.to(weight.device)).")
    k = idx.shape[0]
    # A symbolic k is never 0 (Dynamo specialises sizes 0 and 1), so this check is static.
    if isinstance(k, int) and k == 0:
        fail(op, "idx is empty (k = 0 kept channels)",
              "Keep at least one channel, or skip the layer: a fully sparse layer is a zero "
              "output and needs no op.")


def check_last_dim(op: str, t: Tensor, name: str, expected: Any, what: str) -> None:
    if t.shape[-1] != expected:
        fail(op, f"{name} has last dimension {t.shape[-1]} but {what} is {expected}",
              f"Pass {name} with shape [..., {expected}].")


def check_bias(op: str, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    if bias is None:
        return
    if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
        fail(op, f"bias has shape {tuple(bias.shape)}, expected [{weight.shape[0]}]",
              "Pass the full (un-gathered) bias of the linear layer, or None.")
    if bias.dtype != x.dtype or bias.device != x.device:
        fail(op, f"bias is {bias.dtype} on {bias.device} but x is {x.dtype} on {x.device}",
              "Cast and move bias to match x and weight.")


def check_rows(op: str, x: Tensor, weight: Tensor, idx: Tensor, bias: Optional[Tensor]) -> None:
    check_weight_idx(op, x, weight, idx)
    check_last_dim(op, x, "x", weight.shape[1], "weight's in_features")
    check_bias(op, x, weight, bias)


def check_cols_kept(op: str, x: Tensor, weight: Tensor, idx: Tensor, x_name: str = "x") -> None:
    check_weight_idx(op, x, weight, idx, x_name)
    check_last_dim(op, x, x_name, idx.shape[0], "the number of kept channels len(idx)")


def check_cols_full(op: str, x: Tensor, weight: Tensor, idx: Tensor, x_name: str = "x") -> None:
    check_weight_idx(op, x, weight, idx, x_name)
    check_last_dim(op, x, x_name, weight.shape[1], "weight's in_features")


def check_rows_dx(grad: Tensor, weight: Tensor, idx: Tensor, in_features: int) -> None:
    check_cols_kept("rows_linear_dx", grad, weight, idx, "grad")
    if in_features != weight.shape[1]:
        fail("rows_linear_dx", f"in_features is {in_features} but weight has "
              f"{weight.shape[1]} input features", "Pass weight.shape[1].")


def check_cols_dx(grad: Tensor, weight: Tensor, idx: Tensor) -> None:
    check_weight_idx("cols_linear_dx", grad, weight, idx, "grad")
    check_last_dim("cols_linear_dx", grad, "grad", weight.shape[0], "weight's out_features")
