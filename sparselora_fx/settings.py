"""Backend options, parsed and validated once per compile.

``torch.compile(model, backend="sparselora", options={...})`` hands the dict to the backend;
everything a user may tune lives here or in the Policy, nowhere else.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from .errors import OptionsError

INNER_COMPILERS = ("inductor", "aot_eager", "eager")

OPTION_DOCS: dict[str, str] = {
    "policy": "a sparselora_fx.Policy, a policy file path (.toml/.json) or a preset name",
    "sparsity": "a float in [0, 1): alone, every group sparse from the first step with no warm-up; with a policy, it overrides the policy's sparsities only",
    "inner": f"the compiler that lowers the rewritten graph: one of {', '.join(INNER_COMPILERS)}",
    "inductor": "a dict of Inductor config patches (e.g. {'max_autotune': True})",
    "dump_dir": "a folder to write each graph before/after each pass and the report (or env SPARSELORA_DUMP_DIR)",
    "estimator_rank": "override the SVD estimator's rank for every group kind",
    "sparse_eval": "also run sparse when gradients are off (eval, no_grad); default False: dense",
    "progress": "show progress bars while estimator factors are built (default True)",
    "schedule": "a sparselora_fx.runtime.schedule.StepSchedule: dense warm-up steps, then sparse, with no recompile (required when the policy has a warm-up)",
}


@dataclass(frozen=True)
class Settings:
    """Validated backend options (see ``OPTION_DOCS`` for each key)."""

    policy: Any
    inner: str = "inductor"
    inductor: Mapping[str, Any] = field(default_factory=dict)
    dump_dir: Path | None = None
    estimator_rank: int | None = None
    sparse_eval: bool = False
    progress: bool = True
    schedule: Any = None

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> "Settings":
        """Parse ``options``; unknown keys and bad values raise OptionsError naming the choices."""
        from .policy import Policy

        options = dict(options or {})
        unknown = sorted(set(options) - set(OPTION_DOCS))
        if unknown:
            key = unknown[0]
            close = difflib.get_close_matches(key, OPTION_DOCS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            choices = "\n".join(f"  {k}: {v}" for k, v in OPTION_DOCS.items())
            raise OptionsError(f"unknown sparselora option {key!r}.{hint} Valid options:\n{choices}")

        inner = options.get("inner", "inductor")
        if inner not in INNER_COMPILERS:
            close = difflib.get_close_matches(str(inner), INNER_COMPILERS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise OptionsError(f"unknown inner compiler {inner!r} in options['inner'].{hint} "
                               f"Choose one of: {', '.join(INNER_COMPILERS)}.")
        inductor = options.get("inductor", {}) or {}
        if not isinstance(inductor, Mapping):
            raise OptionsError(f"options['inductor'] must be a dict of Inductor config patches, got {type(inductor).__name__}")
        if inductor and inner != "inductor":
            raise OptionsError(f"options['inductor'] patches Inductor, but options['inner'] is {inner!r}; "
                               "drop one of them")

        if "sparsity" in options and options.get("policy") is None:
            # the shortcut alone: every group sparse from the first step, all tokens, no warm-up
            policy = Policy(source="options['sparsity']").with_sparsity(_sparsity(options["sparsity"]))
        else:
            policy = Policy.coerce(options.get("policy"))
            if "sparsity" in options:  # with a policy: override its sparsities only
                policy = policy.with_sparsity(_sparsity(options["sparsity"]))

        rank = options.get("estimator_rank")
        if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
            raise OptionsError(f"options['estimator_rank'] must be a positive int, got {rank!r}")

        dump = options.get("dump_dir", os.environ.get("SPARSELORA_DUMP_DIR") or None)
        return cls(policy=policy, inner=inner, inductor=dict(inductor),
                   dump_dir=Path(dump) if dump else None, estimator_rank=rank,
                   sparse_eval=bool(options.get("sparse_eval", False)),
                   progress=bool(options.get("progress", True)),
                   schedule=options.get("schedule"))

    def replace(self, **changes: Any) -> "Settings":
        return replace(self, **changes)


def _sparsity(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OptionsError(f"options['sparsity'] must be a float in [0, 1), got {value!r}")
    if not 0.0 <= float(value) < 1.0:
        raise OptionsError(f"options['sparsity'] = {value!r} is outside [0, 1): it is the fraction of "
                           "channels dropped (0 keeps all, 0.9 keeps a tenth)")
    return float(value)
