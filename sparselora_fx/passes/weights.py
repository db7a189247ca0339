"""The frozen weights' values at compile time, as the sparse ops will see them.

Why a module of its own: the estimator-factor pass builds SVD factors from exactly the tensor the
``select_*`` ops get at run time (Conv1D's ``W.t()``, a fused projection's rows), and the rewrite
checks the same values; both read them here instead of one pass reaching into the other.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import GraphModule, Node

from ..factor_cache import has_values
from .analyse.units import LoraUnit


def real_weights(gm: GraphModule, example_inputs: list[Any]) -> dict[Node, torch.Tensor]:
    """Top-level placeholders whose example input is a real tensor with values (parameters under
    inlined nn modules); fake or meta inputs (DDP pieces, export) are left out."""
    def real(v: Any) -> bool:
        return isinstance(v, torch.Tensor) and has_values(v, at_compile_time=True)

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return {n: v for n, v in zip(placeholders, example_inputs) if real(v)}



def oriented_weight(unit: LoraUnit, weight: torch.Tensor) -> torch.Tensor:
    """The value ``_oriented`` gives the sparse ops for ``unit``, from the frozen weight's value.

    Why: estimator factors are keyed by the values of exactly that tensor, so they can be built
    at compile time (``pass_prepare_estimators``) rather than on the first step.
    """
    w = weight.t() if unit.base.weight_transposed else weight
    part = unit.part
    if part is None:
        return w
    if part.block == part.width:
        return w[part.offset:part.offset + part.width]
    return w.unflatten(0, (-1, part.period))[:, part.offset:part.offset + part.block].flatten(0, 1)
