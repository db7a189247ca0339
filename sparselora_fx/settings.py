"""Backend options, parsed and validated once per compile.

``torch.compile(model, backend="sparselora", options={...})`` hands the dict to the backend;
everything a user may tune lives here or in the Policy, nowhere else. The option keys ARE the
``Settings`` fields (each with its doc beside it) plus the two input-only keys of
``INPUT_ONLY_OPTIONS``; ``option_docs()`` lists them all, and the unknown-key error, the tests
and the README's "### Options" table follow that one list.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from .errors import OptionsError
from .policy import Policy
from .runtime.schedule import StepSchedule

INNER_COMPILERS = ("inductor", "aot_eager", "eager")


def _option(doc: str, **kwargs: Any) -> Any:
    """A ``Settings`` field that is an option key of the same name, documented by ``doc``."""
    return field(metadata={"doc": doc}, **kwargs)


@dataclass(frozen=True)
class Settings:
    """Validated backend options: one field per option key (``option_docs()`` has each doc)."""

    policy: Policy = _option(
        "a sparselora_fx.Policy, a policy file path (.toml/.json) or a preset name")
    inner: str = _option(
        f"the compiler that lowers the rewritten graph: one of {', '.join(INNER_COMPILERS)}", default="inductor")
    inductor: Mapping[str, Any] = _option(
        "a dict of Inductor config patches (e.g. {'max_autotune': True})", default_factory=dict)
    dump_dir: Path | None = _option(
        "a folder to write each graph before/after each pass and the report (or env SPARSELORA_DUMP_DIR); "
        "created if missing, and it must be writable", default=None)
    estimator_rank: int | None = _option(
        "override the SVD estimator's rank for every group kind", default=None)
    sparse_eval: bool = _option(
        "True or False: also run sparse when gradients are off (torch.no_grad, inference_mode); default False: "
        "those graphs run dense. Gradients decide, not model.eval(): eval mode with gradients on runs sparse",
        default=False)
    progress: bool = _option(
        "True or False: show progress bars while estimator factors are built (default True)", default=True)
    schedule: StepSchedule | None = _option(
        "a sparselora_fx.runtime.schedule.StepSchedule: dense warm-up steps, then sparse, with no recompile "
        "(required when the policy has a warm-up)", default=None)
    layer: int | None = _option(
        "per-layer compile (FSDP2, torchtune, layer.compile): the index (from 0) of the decoder layer this "
        "compile holds; its units are matched as that layer's", default=None)

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None, *, require_schedule: bool = False) -> "Settings":
        """Parse ``options``; unknown keys and bad values raise OptionsError naming the choices.

        ``require_schedule``: a policy with a warm-up needs ``options['schedule']``. The backend
        asks for it (it compiles graphs that train); ``explain``, FLOP counting and
        ``compile_for_trainer`` (which builds the schedule itself) parse without it. A schedule
        that is given is checked against the policy either way.
        """
        if options is not None and not isinstance(options, Mapping):
            raise OptionsError(f"options must be a dict of sparselora options, got {type(options).__name__} "
                               f"{options!r}; e.g. options={{'policy': 'default'}} or options={{'sparsity': 0.5}}")
        options = dict(options or {})
        docs = option_docs()
        unknown = sorted(set(options) - set(docs))
        if unknown:
            key = unknown[0]
            close = difflib.get_close_matches(key, docs, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            choices = "\n".join(f"  {k}: {v}" for k, v in docs.items())
            raise OptionsError(f"unknown sparselora option {key!r}.{hint} Valid options:\n{choices}")
        default = {f.name: f.default for f in fields(cls) if f.default is not MISSING}

        inner = options.get("inner", default["inner"])
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

        sparse_eval = _flag(options, "sparse_eval", default["sparse_eval"])
        progress = _flag(options, "progress", default["progress"])
        schedule = schedule_for(policy, options.get("schedule"), required=require_schedule)
        dump_dir = _dump_dir(options)  # last: it creates the folder, so only once the rest is valid
        return cls(policy=policy, inner=inner, inductor=dict(inductor), dump_dir=dump_dir, estimator_rank=rank,
                   sparse_eval=sparse_eval, progress=progress, schedule=schedule, layer=layer)

    def replace(self, **changes: Any) -> "Settings":
        return replace(self, **changes)


#: Option keys that are read by ``from_options`` and folded into ``Settings.policy``, so they are
#: no fields of their own; with the fields they make every key ``options`` may hold.
INPUT_ONLY_OPTIONS: Mapping[str, str] = {
    "sparsity": "a float in [0, 1): alone, every group sparse from the first step with no warm-up; with a "
                "policy, it overrides the policy's sparsities only",
    "num_layers": "the model's depth, for ramps and negative layer indices when the graph cannot show it "
                  "(per-layer compiles, DDP splits); must agree with the policy's num_layers when it sets one",
}


def option_docs() -> dict[str, str]:
    """Every option key with its doc: the ``Settings`` fields, then ``INPUT_ONLY_OPTIONS``."""
    return {**{f.name: f.metadata["doc"] for f in fields(Settings)}, **INPUT_ONLY_OPTIONS}


def _bind_depth(policy: Policy, num_layers: Any) -> Policy:
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


def _layer(value: Any, policy: Policy) -> int | None:
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


def _flag(options: Mapping[str, Any], key: str, default: bool) -> bool:
    """A boolean option: True or False only (``bool("no")`` is True, so strings are refused)."""
    value = options.get(key, default)
    if not isinstance(value, bool):
        raise OptionsError(f"options[{key!r}] must be True or False, got {value!r} ({type(value).__name__}); "
                           "pass the Python bool itself (a string such as 'no' would read as True)")
    return value


def _dump_dir(options: Mapping[str, Any]) -> Path | None:
    """``options['dump_dir']`` (else env SPARSELORA_DUMP_DIR) as a folder made and proven writable now.

    Why now: a folder that cannot be written would otherwise fail while the passes run, in the
    middle of the first training step; here the error says which setting, what is wrong and how
    to fix it, before anything is traced.
    """
    from .dump import prepare_dump_dir

    if "dump_dir" in options:
        value, where = options["dump_dir"], "options['dump_dir']"
        fix = "pass a folder you can write to (it is created if missing) or drop the option"
    else:
        value, where = os.environ.get("SPARSELORA_DUMP_DIR"), "env SPARSELORA_DUMP_DIR"
        fix = "set it to a folder you can write to (it is created if missing) or unset it"
    if value is None or value == "":
        return None
    text = os.fspath(value) if isinstance(value, os.PathLike) else value
    if not isinstance(text, str):
        raise OptionsError(f"{where} must be a folder path (a str or os.PathLike), got {value!r} "
                           f"({type(value).__name__})")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise OptionsError(f"{where} = {text!r} is a file, not a folder; {fix}")
    try:
        prepare_dump_dir(path)
    except OSError as err:
        raise OptionsError(f"{where} = {text!r} cannot be written to ({err.strerror or type(err).__name__}); "
                           f"{fix}") from None
    return path


def _policy_warmup(policy: Policy, total_steps: int | None = None) -> int | None:
    """The policy's warm-up in steps; None when it asks for none; -1 when a fraction lacks a total."""
    if policy.warmup_fraction is None:
        return policy.warmup_steps or None
    total = total_steps if total_steps is not None else policy.total_steps
    return policy.warmup_steps_for(total) if total is not None else -1


def schedule_for(policy: Policy, schedule: Any, *, required: bool = True) -> StepSchedule | None:
    """The schedule a compile uses: the one given, None without warm-up, else an error saying how.

    Why: a warm-up needs the optimizer step count, which the backend cannot see; silently
    ignoring it (sparse from step 1) or guessing from forward calls (wrong under gradient
    accumulation) would both be wrong, so a warm-up policy without a schedule is refused with the
    three lines that fix it (unless ``required`` is False: a caller that never trains). A schedule
    whose warm-up contradicts the policy's is refused too.
    """
    if schedule is not None and not isinstance(schedule, StepSchedule):
        raise OptionsError(f"options['schedule'] must be a sparselora_fx.runtime.schedule.StepSchedule, "
                           f"got {type(schedule).__name__}.")
    if schedule is None and not required:
        return None
    wanted = _policy_warmup(policy, None if schedule is None else schedule.total_steps)
    if schedule is None:
        if wanted is None:
            return None
        how = ("warmup_fraction = {0} of the run".format(policy.warmup_fraction) if wanted == -1
               else f"{wanted} dense warm-up steps")
        raise OptionsError(
            f"policy {policy.source} asks for {how}, but the backend cannot count optimizer steps "
            "by itself. Pass a schedule:\n"
            "    from sparselora_fx.runtime.schedule import StepSchedule\n"
            "    schedule = StepSchedule.from_policy(policy, total_steps=N)  # N optimizer steps\n"
            "    schedule.attach(optimizer)\n"
            "    torch.compile(model, backend='sparselora', options={'policy': policy, 'schedule': schedule})\n"
            "or set warmup_steps = 0 in the policy to run sparse from the first step.")
    if wanted not in (None, -1) and wanted != schedule.warmup_steps:
        raise OptionsError(
            f"policy {policy.source} asks for {wanted} warm-up steps but options['schedule'] has "
            f"warmup_steps={schedule.warmup_steps}; build the schedule with "
            "StepSchedule.from_policy(policy, total_steps=N) or make them agree.")
    return schedule
