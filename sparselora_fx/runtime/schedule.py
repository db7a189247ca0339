"""Step sensitivity: run the first N optimizer steps dense, then sparse, without recompiling.

The paper keeps the first ~5% of optimizer steps dense (the estimator's picks are poor while
the LoRA branch is still near its start). A compiled graph cannot read a step counter, so the
backend compiles TWO variants of each graph, dense and sparse, lazily on first need, and a
small Python wrapper picks one per call by reading a ``StepSchedule``. The read happens at run
time, not at compile time: crossing the warm-up boundary switches variant with no Dynamo
recompile and no new backend call.

Steps are OPTIMIZER steps, not forward calls: with gradient accumulation every micro-batch of
one optimizer step runs the same variant. Attach the schedule to the optimizer
(``schedule.attach(optimizer)``) or call ``schedule.step()`` after each ``optimizer.step()``.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Callable, Mapping

import torch

from ..errors import OptionsError

log = logging.getLogger("sparselora_fx")

__all__ = ["ScheduledGraph", "StepSchedule"]  # a compile's schedule is checked in settings.schedule_for

_STATE_KEYS = ("steps", "warmup_steps", "total_steps")


def _check_count(value: Any, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise OptionsError(f"StepSchedule: {what} must be an int >= {minimum}, got {value!r}.")
    return value


class StepSchedule:
    """Counts optimizer steps and says whether the current step runs dense (warm-up) or sparse.

    Why: the only state the step sensitivity needs is an integer, and it must survive a
    checkpoint, so it lives in one small object with ``state_dict``/``load_state_dict`` that the
    compiled graphs read at run time. ``steps`` counts COMPLETED optimizer steps: while
    ``steps < warmup_steps`` the graphs run dense (1-based optimizer steps 1..warmup_steps).
    """

    def __init__(self, warmup_steps: int, *, total_steps: int | None = None, steps: int = 0) -> None:
        self._warmup = _check_count(warmup_steps, "warmup_steps", 0)
        self._total = None if total_steps is None else _check_count(total_steps, "total_steps", 1)
        self._steps = _check_count(steps, "steps", 0)
        self._attached: _AttachHandle | None = None
        if self._total is not None and self._warmup > self._total:
            warnings.warn(f"StepSchedule: warmup_steps={self._warmup} is more than total_steps={self._total}: "
                          "the whole run stays dense. Lower the warm-up (or its fraction) or check total_steps.",
                          stacklevel=2)

    @classmethod
    def from_policy(cls, policy: Any, total_steps: int | None = None) -> "StepSchedule":
        """A schedule with the policy's warm-up (``warmup_steps``, or ``warmup_fraction`` of the run).

        Why: the policy file states the warm-up; a fraction needs the run's total optimizer steps
        (this argument, else the policy's ``total_steps``), and the error says so if neither is set.
        """
        from ..policy import Policy

        policy = Policy.coerce(policy)
        total = total_steps if total_steps is not None else policy.total_steps
        return cls(policy.warmup_steps_for(total), total_steps=total)

    # ---- queries --------------------------------------------------------------------------

    @property
    def steps(self) -> int:
        """Optimizer steps completed so far."""
        return self._steps

    @property
    def warmup_steps(self) -> int:
        """Number of dense optimizer steps at the start of the run."""
        return self._warmup

    @property
    def total_steps(self) -> int | None:
        """The run's total optimizer steps, when known (informational)."""
        return self._total

    @property
    def sparse(self) -> bool:
        """True once the warm-up is over: the step now running uses the sparse variant."""
        return self._steps >= self._warmup

    @property
    def phase(self) -> str:
        """``"dense"`` during warm-up, then ``"sparse"``."""
        return "sparse" if self.sparse else "dense"

    # ---- advancing ------------------------------------------------------------------------

    def step(self, n: int = 1) -> None:
        """Record ``n`` completed optimizer steps (call after ``optimizer.step()`` if not attached)."""
        self._steps += _check_count(n, "step(n): n", 1)

    def attach(self, optimizer: torch.optim.Optimizer) -> "_AttachHandle":
        """Advance on every ``optimizer.step()``; returns the hook handle (``.remove()`` detaches).

        Why: counting optimizer steps where they happen means gradient accumulation and skipped
        steps (a GradScaler that finds inf/nan never calls ``optimizer.step``) are counted right.
        One optimizer at a time: with two, each training step would count twice and the warm-up
        would silently halve, so a second ``attach`` is refused until the first handle is removed.
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise OptionsError(f"StepSchedule.attach: expected a torch.optim.Optimizer, got "
                                f"{type(optimizer).__name__}; for other loops call schedule.step() "
                                "after each optimizer step instead.")
        if self._attached is not None:
            same = self._attached.optimizer is optimizer
            raise OptionsError("StepSchedule.attach: " + (
                "this optimizer is attached already; attaching it twice would count each step twice."
                if same else
                "the schedule is attached to another optimizer already; with two, every training step "
                "would count twice (a halved warm-up). Attach the one optimizer that steps once per "
                "training step, or call schedule.step() once per training step yourself; "
                "handle.remove() detaches the first."))

        def _hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self.step()

        self._attached = _AttachHandle(self, optimizer, optimizer.register_step_post_hook(_hook))
        return self._attached

    # ---- checkpointing --------------------------------------------------------------------

    def state_dict(self) -> dict[str, int | None]:
        """Plain ints (``torch.load(weights_only=True)`` safe) to save next to model and optimizer."""
        return {"steps": self._steps, "warmup_steps": self._warmup, "total_steps": self._total}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue where a saved run stopped; like LR schedulers, the saved warm-up replaces ours."""
        if not isinstance(state, Mapping):
            raise OptionsError(f"StepSchedule.load_state_dict: expected a dict from state_dict(), "
                                f"got {type(state).__name__}.")
        missing = [k for k in _STATE_KEYS if k not in state]
        extra = sorted(set(state) - set(_STATE_KEYS))
        if missing or extra:
            raise OptionsError(f"StepSchedule.load_state_dict: keys {sorted(state)} are not a schedule "
                                f"state (missing {missing}, unexpected {extra}); pass what "
                                "StepSchedule.state_dict() returned.")
        steps = _check_count(state["steps"], "state['steps']", 0)
        warmup = _check_count(state["warmup_steps"], "state['warmup_steps']", 0)
        total = state["total_steps"]
        total = None if total is None else _check_count(total, "state['total_steps']", 1)
        self._steps, self._warmup, self._total = steps, warmup, total

    def __repr__(self) -> str:
        return (f"StepSchedule(steps={self._steps}, warmup_steps={self._warmup}, "
                f"total_steps={self._total}, phase={self.phase!r})")


class _AttachHandle:
    """What ``StepSchedule.attach`` returns: ``remove()`` drops the hook and frees the schedule to attach again."""

    def __init__(self, schedule: StepSchedule, optimizer: torch.optim.Optimizer, hook: Any) -> None:
        self._schedule, self.optimizer, self._hook = schedule, optimizer, hook

    def remove(self) -> None:
        self._hook.remove()
        if self._schedule._attached is self:
            self._schedule._attached = None


def _is_dynamic(example_inputs: list[Any]) -> bool:
    """Whether Dynamo traced with symbolic sizes (a lazy compile from real args would specialise)."""
    for x in example_inputs:
        if isinstance(x, torch.SymInt):
            return True
        if isinstance(x, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in x.shape):
            return True
    return False


class ScheduledGraph:
    """One compiled graph with a dense and a sparse variant, chosen per call from a StepSchedule.

    Why: switching at the warm-up boundary must not recompile. Each variant is built by its
    ``build_*`` callable on first need (the sparse one builds estimator factors, the dense one
    is the untouched graph), using the call's own arguments as example inputs; when Dynamo
    traced with symbolic shapes both are built up front instead (``example_inputs`` then carry
    the symbols a lazy compile from concrete args would lose).
    """

    def __init__(self, schedule: StepSchedule, build_dense: Callable[[list[Any]], Callable[..., Any]],
                 build_sparse: Callable[[list[Any]], Callable[..., Any]], example_inputs: list[Any]) -> None:
        self.schedule = schedule
        self._builders = {"dense": build_dense, "sparse": build_sparse}
        self._compiled: dict[str, Callable[..., Any]] = {}
        self.calls = {"dense": 0, "sparse": 0}
        phases = ("dense", "sparse") if _is_dynamic(example_inputs) else (schedule.phase,)
        for phase in phases:
            self._build(phase, list(example_inputs))

    def _build(self, phase: str, example_inputs: list[Any]) -> Callable[..., Any]:
        log.info("sparselora: compiling the %s variant (schedule %r)", phase, self.schedule)
        fn = self._builders.pop(phase)(example_inputs)  # drop the builder: it holds a graph copy
        self._compiled[phase] = fn
        return fn

    @property
    def built(self) -> tuple[str, ...]:
        """The variants compiled so far."""
        return tuple(self._compiled)

    def __call__(self, *args: Any) -> Any:
        phase = self.schedule.phase
        fn = self._compiled.get(phase)
        if fn is None:
            fn = self._build(phase, list(args))
        self.calls[phase] += 1
        return fn(*args)  # Dynamo calls a backend's result unboxed, and so do we
