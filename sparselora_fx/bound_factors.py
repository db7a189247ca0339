"""SVD factors a compiled graph holds as inputs: resolved once at compile time, refilled in place.

Why: a sparse step must do no host work. Looking factors up per step (`factor_cache.get_factors`)
means a memo lookup per weight and, after any version bump, a host-side hash of the whole weight;
inside a CUDA-graph capture it is impossible. So when the backend compiles a graph while it holds
the frozen weights' real values, the rewrite asks here for each estimated weight's factors (built
by `pass_prepare_estimators`, from the factor cache as before) and registers them as buffers of the
graph module; AOTAutograd lifts a graph module's buffers to graph inputs (placeholders, static
inputs for CUDA graphs), so the step reads them like any parameter. Weights without values at
compile time (DDPOptimizer's fake pieces, DTensor shards) keep the run-time lookup.

A binding ties the buffers to the parameter they were built from (a weakref and the recipe for
the tensor the select op reads: `passes.weights.orient`). The buffers are the binding's own copies
(never the cache's tensors), shared by every graph compiled from the same weight, so a refill
cannot corrupt a cache entry. Refills happen in place (`copy_`, no recompile):

- `load_state_dict` and other in-place writes bump the parameter's `_version`: the compiled
  callable (`Guarded`) compares each bound parameter's `_version`, a host int, with the one its
  buffers were filled at before every call (one weakref read and an int compare per bound weight;
  no device work, no sync) and refills the ones that moved;
- a `.data` write does not bump `_version`: `refresh_factors(model)` marks those weights' bindings
  stale, and the next call refills them.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import weakref
from typing import Any, Callable

import torch

from . import factor_cache
from .counters import counters

__all__ = ["Binding", "Guarded", "bind", "bindings_of", "guard", "refill"]

log = logging.getLogger("sparselora_fx")

Spec = tuple[bool, int, int, int, int]


@dataclasses.dataclass(eq=False)
class Binding:
    """The factors (``p`` [in, k], ``q`` [k, out]) of one frozen weight, as graphs hold them."""

    param: weakref.ref
    spec: Spec
    orient: Callable[[torch.Tensor, Spec], torch.Tensor]
    rank: int
    p: torch.Tensor
    q: torch.Tensor
    version: int | None  # the parameter's _version the buffers were filled at; None: stale

    def moved(self) -> bool:
        param = self.param()
        return param is not None and param._version != self.version


_LOCK = threading.RLock()
_BINDINGS: dict[tuple, Binding] = {}


def _key(param: torch.Tensor, spec: Spec, rank: int) -> tuple:
    return (id(param), spec, int(rank))


def bind(param: torch.Tensor, spec: Spec, rank: int,
         orient: Callable[[torch.Tensor, Spec], torch.Tensor]) -> Binding | None:
    """The binding of ``param``'s factors (for the tensor ``orient(param, spec)``), made now from
    the factor cache if there is none; None when the weight has no usable factors."""
    key = _key(param, spec, rank)
    with _LOCK:
        found = _BINDINGS.get(key)
        if found is not None and found.param() is param:
            if found.moved() or found.version is None:
                refill(found)
            return found
        factors = factor_cache.get_factors(orient(param, spec), rank, at_compile_time=True)
        if factors is None:
            return None

        def _forget(ref: weakref.ref, key: tuple = key) -> None:
            with _LOCK:
                current = _BINDINGS.get(key)
                if current is not None and current.param is ref:
                    del _BINDINGS[key]

        with torch.no_grad():
            p, q = factors[0].detach().clone(), factors[1].detach().clone()
        binding = Binding(weakref.ref(param, _forget), spec, orient, int(rank), p, q, param._version)
        _BINDINGS[key] = binding
        counters["sparselora"]["factors_bound"] += 1
        return binding


def refill(binding: Binding) -> bool:
    """Copy fresh factors of the parameter's current values into the binding's tensors, in place.

    False (the buffers keep their values, the binding stays stale) when the parameter is gone or
    its values cannot be read now (freed storage) or give no usable factors.
    """
    param = binding.param()
    if param is None or not factor_cache.has_values(param) or param.untyped_storage().nbytes() == 0:
        return False
    factors = factor_cache.get_factors(binding.orient(param, binding.spec), binding.rank)
    if factors is None or factors[0].shape != binding.p.shape or factors[1].shape != binding.q.shape:
        log.warning("sparselora_fx: no usable factors for a changed frozen weight of shape %s; the "
                    "compiled graph keeps the previous ones", tuple(param.shape))
        return False
    with torch.no_grad():
        binding.p.copy_(factors[0])
        binding.q.copy_(factors[1])
    binding.version = param._version
    counters["sparselora"]["factor_refills"] += 1
    return True


def _mark_stale(ids: set[int], storages: set, everything: bool) -> None:
    """`refresh_factors`' hook: the bindings of the weights it was given refill before their next call."""
    with _LOCK:
        for binding in _BINDINGS.values():
            param = binding.param()
            if param is None:
                continue
            if everything or id(param) in ids or factor_cache._storage_key(param) in storages:
                binding.version = None


factor_cache._REFRESH_HOOKS.append(_mark_stale)


def bindings_of(gm: torch.nn.Module) -> list[Binding]:
    """The bindings whose tensors ``gm`` holds (set by the rewrite), deduplicated."""
    return list(getattr(gm, "_sparselora_bindings", ()))


class Guarded:
    """A compiled graph's callable that first refills the factors of weights changed since.

    The per-call cost is one weakref read and one int compare per bound weight (host only).
    """

    def __init__(self, fn: Callable[..., Any], bindings: list[Binding]) -> None:
        self.fn = fn
        self.bindings = tuple(bindings)

    def __call__(self, *args: Any) -> Any:
        for binding in self.bindings:
            if binding.version is None or binding.moved():
                refill(binding)
        return self.fn(*args)  # Dynamo calls a backend's result unboxed, and so do we


def guard(fn: Callable[..., Any], gm: torch.nn.Module) -> Callable[..., Any]:
    """``fn`` itself when ``gm`` holds no factors, else ``fn`` guarded by ``Guarded``."""
    bindings = bindings_of(gm)
    return Guarded(fn, bindings) if bindings else fn
