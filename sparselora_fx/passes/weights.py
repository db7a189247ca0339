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



def orientation(unit: LoraUnit) -> tuple[bool, int, int, int, int]:
    """How ``_oriented`` derives the select ops' weight from the parameter, as plain ints:
    (transposed, offset, width, block, period) of ``unit``'s part (0, 0, 0, 0 for a whole weight).

    Why plain ints: the factors a graph holds (``bound_factors``) are refilled from the parameter
    after a weight change, so the binding keeps the recipe, never the unit (nor its graph).
    """
    part = unit.part
    if part is None:
        return (bool(unit.base.weight_transposed), 0, 0, 0, 0)
    return (bool(unit.base.weight_transposed), part.offset, part.width, part.block, part.period)


def orient(weight: torch.Tensor, spec: tuple[bool, int, int, int, int]) -> torch.Tensor:
    """The tensor ``orientation`` describes, from the parameter's value."""
    transposed, offset, width, block, period = spec
    w = weight.t() if transposed else weight
    if width == 0:
        return w
    if block == width:
        return w[offset:offset + width]
    return w.unflatten(0, (-1, period))[:, offset:offset + block].flatten(0, 1)


def oriented_weight(unit: LoraUnit, weight: torch.Tensor) -> torch.Tensor:
    """The value ``_oriented`` gives the sparse ops for ``unit``, from the frozen weight's value.

    Why: estimator factors are keyed by the values of exactly that tensor, so they can be built
    at compile time (``pass_prepare_estimators``) rather than on the first step.
    """
    return orient(weight, orientation(unit))
