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
    "layer": "per-layer compile (FSDP2, torchtune, layer.compile): the index (from 0) of the decoder layer this compile holds; its units are matched as that layer's",
    "num_layers": "the model's depth, for ramps and negative layer indices when the graph cannot show it (per-layer compiles, DDP splits); must agree with the policy's num_layers when it sets one",
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
    layer: int | None = None

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

        policy = _bind_depth(policy, options.get("num_layers"))
        layer = _layer(options.get("layer"), policy)

        rank = options.get("estimator_rank")
        if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
            raise OptionsError(f"options['estimator_rank'] must be a positive int, got {rank!r}")

        dump = options.get("dump_dir", os.environ.get("SPARSELORA_DUMP_DIR") or None)
        return cls(policy=policy, inner=inner, inductor=dict(inductor),
                   dump_dir=Path(dump) if dump else None, estimator_rank=rank,
                   sparse_eval=bool(options.get("sparse_eval", False)),
                   progress=bool(options.get("progress", True)),
                   schedule=options.get("schedule"), layer=layer)

    def replace(self, **changes: Any) -> "Settings":
        return replace(self, **changes)


def _bind_depth(policy: Any, num_layers: Any) -> Any:
    """The policy with ``options['num_layers']`` bound; a depth the policy already fixes must agree."""
    if num_layers is None:
        return policy
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise OptionsError(f"options['num_layers'] must be an int >= 1 (the model's number of decoder layers), "
                           f"got {num_layers!r}")
    if policy.num_layers is not None and policy.num_layers != num_layers:
        raise OptionsError(f"options['num_layers'] = {num_layers} but the policy ({policy.source}) sets "
                           f"num_layers = {policy.num_layers}; drop one of them")
    return policy.bind(num_layers=num_layers)


def _layer(value: Any, policy: Any) -> int | None:
    """``options['layer']``, checked against the depth the policy needs (one layer cannot show it)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise OptionsError(f"options['layer'] must be an int >= 0, the index (from 0) of the decoder layer this "
                           f"compile holds (e.g. options={{'layer': i}} for model.layers[i]), got {value!r}")
    if policy.num_layers is None and policy.needs_depth:
        raise OptionsError(f"options['layer'] = {value}: the policy ({policy.source}) has depth ramps or layers "
                           "counted from the end, and one layer cannot show the model's depth; add "
                           "options['num_layers'] = N (the model's number of decoder layers) or set "
                           "num_layers in the policy's [defaults]")
    if policy.num_layers is not None and value >= policy.num_layers:
        raise OptionsError(f"options['layer'] = {value} is beyond num_layers = {policy.num_layers} "
                           f"(layers count from 0, so the last is {policy.num_layers - 1})")
    return value


def _sparsity(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OptionsError(f"options['sparsity'] must be a float in [0, 1), got {value!r}")
    if not 0.0 <= float(value) < 1.0:
        raise OptionsError(f"options['sparsity'] = {value!r} is outside [0, 1): it is the fraction of "
                           "channels dropped (0 keeps all, 0.9 keeps a tenth)")
    return float(value)
