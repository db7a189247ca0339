"""Count the FLOPs a compiled train step really executes, per op.

``FlopCounterMode`` cannot wrap a ``torch.compile``d call (Dynamo does not trace under a dispatch
mode and runs the frame eagerly), so this backend runs the passes, lowers with AOTAutograd, and
executes the forward and backward graphs under the counter itself. What it counts is what the
rewritten graph runs: our ops through their registered FLOP formulas, the rest through aten's.
"""

from __future__ import annotations

import collections
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from . import _compat
from .backend import analyse_and_rewrite
from .settings import Settings


class ExecutedFlops:
    """A backend (``torch.compile(model, backend=ExecutedFlops(options))``) that tallies FLOPs per op.

    ``options`` are the sparselora options; ``rewrite=False`` counts the dense graph the same way,
    for a side-by-side ratio. ``counts`` accumulates over every call until ``reset()``.
    """

    def __init__(self, options: dict[str, Any] | None = None, *, rewrite: bool = True) -> None:
        self.settings = Settings.from_options(options)
        self.rewrite = rewrite
        self.counts: collections.Counter[str] = collections.Counter()

    def reset(self) -> None:
        self.counts.clear()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def by_prefix(self, prefix: str) -> int:
        """FLOPs of the ops whose name starts with ``prefix`` (e.g. ``"sparselora."``)."""
        return sum(v for k, v in self.counts.items() if k.startswith(prefix))

    def _counted(self, gm: torch.fx.GraphModule, example_inputs: Any) -> Callable[..., Any]:
        def run(*args: Any) -> Any:
            with FlopCounterMode(display=False) as counter:
                # an Interpreter calls the ops directly: no module call, so the counter's module
                # tracker never hooks tensors inside an autograd.Function
                out = torch.fx.Interpreter(gm).run(*args)
            for op, n in counter.get_flop_counts()["Global"].items():
                self.counts[str(op)] += n
            return out

        return _compat.boxed(run)

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any], **_: Any) -> Callable[..., Any]:
        if self.rewrite:
            _, gm = analyse_and_rewrite(gm, example_inputs, self.settings)
        return _compat.aot_autograd_backend(self._counted, self._counted)(gm, example_inputs)
