"""Hugging Face Trainer (and TRL's SFTTrainer, a Trainer subclass) with the sparselora backend.

``TrainingArguments.torch_compile_backend`` only accepts a fixed list of names, so the model is
compiled in place (``model.compile(backend="sparselora", options=...)``) before the Trainer is
built; the Trainer then calls the compiled forward like any other. The step schedule (dense
warm-up, then sparse) is driven by ``SparseLoRACallback``, which advances it once per optimizer
step (``on_step_end``) and keeps it in step with ``TrainerState.global_step`` across resumes.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch

from ..errors import OptionsError
from ..runtime.schedule import StepSchedule

log = logging.getLogger("sparselora_fx")

__all__ = ["SCHEDULE_FILE", "SparseLoRACallback", "compile_for_trainer", "enable_activation_checkpointing",
           "unsupported_modules"]

#: The schedule's state, written next to each Trainer checkpoint (``checkpoint-N/``).
SCHEDULE_FILE = "sparselora_schedule.json"

try:  # a TrainerCallback when transformers is here; the class still imports without it
    from transformers import TrainerCallback as _CallbackBase
except ImportError:  # pragma: no cover - transformers is an optional dependency
    _CallbackBase = object  # type: ignore[assignment,misc]


class SparseLoRACallback(_CallbackBase):  # type: ignore[misc,valid-type]
    """Advances a ``StepSchedule`` on every Trainer optimizer step and checkpoints it.

    Why: the compiled graphs read the schedule to pick their dense or sparse variant, and the
    Trainer owns the optimizer loop, so the count must come from the Trainer's own steps
    (``on_step_end`` fires once per optimizer step, after all gradient-accumulation micro-batches).
    On resume the Trainer restores ``global_step`` before ``on_train_begin``; the callback then
    reloads ``sparselora_schedule.json`` from that checkpoint (or, without one, sets the count to
    ``global_step``), so the resumed run continues in the same phase with no recompile.
    When ``policy`` has a ``warmup_fraction`` and the schedule was built before the run length was
    known, the warm-up is resolved at ``on_train_begin`` from ``state.max_steps``.
    """

    def __init__(self, schedule: StepSchedule, *, policy: Any = None) -> None:
        if not isinstance(schedule, StepSchedule):
            raise OptionsError(f"SparseLoRACallback: expected a sparselora_fx.runtime.schedule.StepSchedule, "
                               f"got {type(schedule).__name__}; pass the schedule given to the backend's options.")
        self.schedule = schedule
        self.policy = policy

    # ---- Trainer events ---------------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model = kwargs.get("model")
        if model is not None and is_activation_checkpointing(model):  # the Trainer enabled it just before
            prepare_activation_checkpointing()
        saved = self._saved_state(args, state)
        if saved is not None:
            self.schedule.load_state_dict(saved)
            log.info("sparselora: schedule restored from checkpoint: %r", self.schedule)
        else:
            warmup, total = self.schedule.warmup_steps, self.schedule.total_steps
            if self.policy is not None and total is None and getattr(self.policy, "warmup_fraction", None) is not None:
                total = int(state.max_steps)
                warmup = self.policy.warmup_steps_for(total)
            self.schedule.load_state_dict({"steps": int(state.global_step), "warmup_steps": warmup,
                                           "total_steps": total})
        if self.schedule.steps != state.global_step:
            raise OptionsError(f"SparseLoRACallback: the checkpoint's schedule counts {self.schedule.steps} steps "
                               f"but the Trainer resumes at step {state.global_step}; the {SCHEDULE_FILE} in "
                               "the checkpoint folder does not belong to this checkpoint. Delete it to recount "
                               "from the Trainer's step.")

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        behind = state.global_step - self.schedule.steps
        if behind == 1:
            self.schedule.step()
        elif behind != 0:  # 0: schedule.attach(optimizer) counted this step already
            raise OptionsError(f"SparseLoRACallback: the schedule counts {self.schedule.steps} optimizer steps but "
                               f"the Trainer is at step {state.global_step}. Something else advances the same "
                               "schedule (call schedule.step() or attach() in one place only), or the callback "
                               "was added after training started.")

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        folder = _checkpoint_dir(args, state.global_step)
        if not os.path.isdir(folder):  # save_only_model or a custom save: nothing to sit next to
            return
        if int(getattr(args, "process_index", 0) or 0) != 0:
            return
        with open(os.path.join(folder, SCHEDULE_FILE), "w") as fh:
            json.dump(self.schedule.state_dict(), fh)

    # ---- helpers ----------------------------------------------------------------------------

    def _saved_state(self, args: Any, state: Any) -> dict[str, Any] | None:
        if not state.global_step:
            return None
        path = os.path.join(_checkpoint_dir(args, state.global_step), SCHEDULE_FILE)
        if not os.path.isfile(path):
            return None
        with open(path) as fh:
            return json.load(fh)


def is_activation_checkpointing(model: torch.nn.Module) -> bool:
    """Whether a transformers model (or a PEFT wrapper of one) has activation checkpointing on.

    Reads the per-module ``gradient_checkpointing`` flag that every release sets, since the
    model-level property was renamed in 5.25 (``is_gradient_checkpointing`` now warns).
    """
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) is True:
            return True
    return False


def prepare_activation_checkpointing() -> None:
    """Make checkpointed decoder layers traceable by Dynamo (see ``_compat``'s switch for why)."""
    from .. import _compat

    if _compat.allow_checkpoint_forward_side_effects():
        log.info("sparselora: Dynamo set to trace checkpointed layers whose forward sets a context "
                 "variable (transformers' kernels hooks); without it they would run eager and dense")


def enable_activation_checkpointing(model: torch.nn.Module, **checkpoint_kwargs: Any) -> torch.nn.Module:
    """Turn on non-reentrant activation checkpointing on a transformers model, the way the backend can see it.

    Why: on transformers >= 5.25 a plain ``gradient_checkpointing_enable()`` leaves every
    checkpointed decoder layer untraceable by Dynamo (a side effect inside the checkpoint, see
    ``_compat.allow_checkpoint_forward_side_effects``): the layers run eager, dense, with no
    warning. This calls ``activation_checkpointing_enable`` (or, on older releases,
    ``gradient_checkpointing_enable``) with ``use_reentrant=False`` unless told otherwise, and sets
    the Dynamo switch that lets the checkpointed layers be traced and rewritten.
    """
    kwargs = {"use_reentrant": False, **checkpoint_kwargs}
    if kwargs["use_reentrant"]:
        raise OptionsError("enable_activation_checkpointing: use_reentrant=True is an autograd.Function that "
                           "Dynamo does not trace into, so every checkpointed layer would run dense; "
                           "leave use_reentrant at False.")
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise OptionsError(f"enable_activation_checkpointing: {type(model).__name__} is not a transformers model "
                           "(no activation_checkpointing_enable or gradient_checkpointing_enable); wrap the "
                           "layers in torch.utils.checkpoint.checkpoint(..., use_reentrant=False) yourself.")
    prepare_activation_checkpointing()
    return model


def _checkpoint_dir(args: Any, step: int) -> str:
    return os.path.join(args.output_dir, f"checkpoint-{step}")


def compile_for_trainer(model: torch.nn.Module, policy: Any = None, *, schedule: StepSchedule | None = None,
                        total_steps: int | None = None, **options: Any) -> tuple[torch.nn.Module, SparseLoRACallback]:
    """Compile ``model`` in place with the sparselora backend; return it and the Trainer callback.

    Why: a Trainer takes a model, not a compiled wrapper, and cannot name our backend in
    ``TrainingArguments``; compiling in place keeps ``trainer.model`` the user's module (state
    dict keys, saving, PEFT methods unchanged) while its forward runs compiled. ``options`` are
    the backend's (``inner``, ``sparsity``, ``dump_dir`` ...). Without ``schedule`` one is built
    from the policy: its ``warmup_steps``, or its ``warmup_fraction`` of ``total_steps`` (when
    ``total_steps`` is not given, of the Trainer's ``max_steps``, read when training begins).
    Pass the returned callback to ``Trainer(callbacks=[callback])``.
    """
    from ..settings import Settings

    if not isinstance(model, torch.nn.Module):
        raise OptionsError(f"compile_for_trainer: expected a torch.nn.Module, got {type(model).__name__}.")
    backend_options = dict(options)
    if policy is not None:
        backend_options["policy"] = policy
    settings = Settings.from_options(backend_options)  # validates the options now, not at the first step
    resolved = settings.policy
    deferred = None
    if schedule is None:
        total = total_steps if total_steps is not None else resolved.total_steps
        if resolved.warmup_fraction is not None and total is None:
            schedule, deferred = StepSchedule(0), resolved  # resolved at on_train_begin from max_steps
        else:
            schedule = StepSchedule(resolved.warmup_steps_for(total), total_steps=total)
    backend_options["policy"] = resolved
    backend_options["schedule"] = schedule
    for name, reason in unsupported_modules(model):
        log.warning("sparselora: %s runs dense: %s", name, reason)
    model.compile(backend="sparselora", options=backend_options)
    return model, SparseLoRACallback(schedule, policy=deferred)


def unsupported_modules(model: torch.nn.Module) -> list[tuple[str, str]]:
    """LoRA layers of ``model`` that the backend leaves dense (QLoRA bases, DoRA), as ``(module path, reason)``.

    Why: inside a compiled graph a graph break can hide a layer's module path (PEFT's DoRA layer
    breaks the graph); the model itself still knows every name, so this lists them up front.
    """
    from ..names import normalize_module_name
    from ..passes.analyse.unsupported import DORA_REASON, QLORA_REASON

    out: list[tuple[str, str]] = []
    for name, module in model.named_modules():
        if not hasattr(module, "lora_A") or not hasattr(module, "base_layer"):
            continue
        path = normalize_module_name(name)
        magnitude = getattr(module, "lora_magnitude_vector", None)
        if magnitude is not None and len(magnitude) > 0:
            out.append((path, DORA_REASON))
            continue
        weight = getattr(module.base_layer, "weight", None)
        kind = type(module.base_layer).__module__
        if kind.startswith("bitsandbytes"):
            out.append((path, QLORA_REASON.format(what=f"bitsandbytes {type(module.base_layer).__name__}")))
        elif isinstance(weight, torch.Tensor) and not weight.is_floating_point():
            out.append((path, QLORA_REASON.format(what=f"{weight.dtype} weight")))
    return out
