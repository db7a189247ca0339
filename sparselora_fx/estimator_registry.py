"""The estimator kinds by name: which exist, which knobs a policy may set for each, what builds them.

Why here, at the package top: the policy (user configuration, read at compile time) checks the kind
an `estimator` entry names, and the runtime builds the estimator of that kind; both read this one
table, so the policy never imports run-time code and a kind added with
`runtime.estimators.register_estimator` can be named in a policy file. The built-in kinds are
declared here with their knobs (so a policy can be read before the runtime is imported);
`runtime.estimators` binds each to its class when it is imported.

Pure Python, no torch: nothing here may import the runtime.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import OptionsError

__all__ = ["KNOBS", "EstimatorKind", "kinds", "lookup", "register", "unregister"]

#: The parameters a policy's estimator entry can carry (the fields of `policy.EstimatorSpec`
#: besides `kind`), and the knobs the selection ops pass to every estimator.
KNOBS: tuple[str, ...] = ("rank", "samples", "seed", "fraction")


@dataclass(frozen=True)
class EstimatorKind:
    """One estimator kind: its name, the knobs a policy may set for it, what builds it.

    `factory` is the run-time class (a frozen dataclass called with its knobs); None for a built-in
    until `runtime.estimators` is imported.
    """

    name: str
    params: tuple[str, ...]
    factory: Callable[..., Any] | None = None


# The built-ins, in the order error messages list them. SVD's `samples` / `seed` configure only
# its token-sample fallback, so a policy sets just its rank.
_KINDS: dict[str, EstimatorKind] = {
    "svd": EstimatorKind("svd", ("rank",)),
    "token_sample": EstimatorKind("token_sample", ("samples", "seed", "fraction")),
    "random": EstimatorKind("random", ("seed",)),
}
_BUILT_IN = frozenset(_KINDS)


def register(name: str, factory: Callable[..., Any], params: Sequence[str] | None = None) -> EstimatorKind:
    """Add kind `name` built by `factory`, or re-bind a known kind to a new factory.

    `params` None: a known kind keeps its knobs; a new one takes the `KNOBS` that `factory` (a
    dataclass) accepts as init fields. The knobs come back in `KNOBS` order.
    """
    if params is None:
        known = _KINDS.get(name)
        if known is not None:
            params = known.params
        elif dataclasses.is_dataclass(factory):
            fields = {f.name for f in dataclasses.fields(factory) if f.init}
            params = [k for k in KNOBS if k in fields]
        else:
            params = ()
    stray = [p for p in params if p not in KNOBS]
    if stray:
        raise OptionsError(f"estimator kind {name!r}: unknown knob(s) {stray}; a policy can set {', '.join(KNOBS)}.")
    entry = EstimatorKind(name, tuple(k for k in KNOBS if k in params), factory)
    _KINDS[name] = entry
    return entry


def unregister(name: str) -> None:
    """Remove a kind added with `register` (tests, plug-ins that clean up); built-ins stay."""
    if name in _BUILT_IN:
        raise OptionsError(f"estimator kind {name!r} is built in and cannot be unregistered.")
    _KINDS.pop(name, None)


def lookup(name: str) -> EstimatorKind | None:
    """The entry of kind `name`, or None when no such kind is registered."""
    return _KINDS.get(name) if isinstance(name, str) else None


def kinds() -> tuple[str, ...]:
    """The registered kind names: the built-ins first, then others in registration order."""
    return tuple(_KINDS)
