"""``explain(model, *args)``: what the backend would do to a model, without training it."""

from __future__ import annotations

from typing import Any, Callable

import torch

from .report import Report
from .settings import Settings


def explain(model: Callable[..., Any], *example_args: Any, options: dict[str, Any] | None = None,
            **example_kwargs: Any) -> Report:
    """Trace ``model(*example_args, **example_kwargs)`` with Dynamo and report units, groups and skips.

    Runs the analysis passes and the plan (never the rewrite) and executes the graphs eagerly, so it
    works on meta-device models too. The returned Report prints as tables.
    """
    from .backend import analyse_and_rewrite

    settings = Settings.from_options(options)
    report = Report()

    def analysis_backend(gm: torch.fx.GraphModule, example_inputs: list[Any], **_: Any) -> Callable[..., Any]:
        r, _gm = analyse_and_rewrite(gm, example_inputs, settings, rewrite=False)
        report.extend(r)
        return gm.forward

    compiled = torch.compile(model, backend=analysis_backend, dynamic=False)
    compiled(*example_args, **example_kwargs)
    # policy rules that select none of the model's units (a typo leaves layers dense): say so
    # (a per-layer graph with options["layer"] is checked under the full names its units stand for)
    layer = settings.layer
    names = [s for u in report.units for s in settings.policy.layer_spellings(u.fqn, layer)]
    report.notes += settings.policy.for_names(names).check_names(names) if names else []
    report.notes = list(dict.fromkeys(report.notes))
    return report
