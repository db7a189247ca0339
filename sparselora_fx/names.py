"""Module names as a user sees them in the transformers model.

Dynamo, PEFT and torch.compile each wrap names in their own layers (``L['self']._modules[...]``,
``base_model.model.``, ``.base_layer``, ``_orig_mod.``); policies and reports use the plain path.
"""

from __future__ import annotations

import re

_SOURCE_TOKEN = re.compile(r"\['([^']*)'\]|\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]")
_WRAPPER_KEYS = {"__dict__", "_modules", "_parameters", "_buffers"}


def source_to_path(source: str) -> str:
    """``L['self']._modules['model']._modules['layers']._modules['0']._parameters['weight']`` -> ``model.layers.0.weight``."""
    parts: list[str] = []
    for match in _SOURCE_TOKEN.finditer(source):
        token = next(g for g in match.groups() if g is not None)
        if token not in _WRAPPER_KEYS:
            parts.append(token)
    if source.startswith(("L['self']", "L['fn']")) and len(parts) > 1:  # the traced module itself
        parts = parts[1:]
    return ".".join(parts)


PEFT_PREFIX = "base_model.model."
#: The module paths of the PEFT wrapper itself (not a module of the user's model).
PEFT_ROOTS = frozenset({"base_model", "base_model.model"})

# Wrapper components that never appear in the name a user sees in the transformers model.
_WRAPPER_PARTS = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")
_ADAPTER_SUFFIX = re.compile(
    r"\.(?:lora_A|lora_B|lora_dropout|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.[^.]+)?$"
)
BASE_LAYER_SUFFIX = ".base_layer"
# A part of a fused projection is reported as `qkv_proj[q]`, `gate_up_proj[up]` or `c_fc[0:96]`.
_PART_SUFFIX = re.compile(r"\[(?:\w+|\d+:\d+)\]$")


def normalize_module_name(name: str) -> str:
    """Return the module path a user sees in the underlying transformers model.

    Why: the same layer shows up as `model.layers.3.mlp.gate_proj`,
    `base_model.model.model.layers.3.mlp.gate_proj.base_layer`, `_orig_mod.model...` or
    `...gate_proj.lora_A.default` depending on PEFT / torch.compile wrapping; rules are written
    once against the plain name. Strips `_orig_mod.` (and FSDP / checkpoint wrapper parts)
    anywhere, a leading `base_model.model.`, PEFT adapter suffixes and a trailing `.base_layer`.
    A part of a fused projection (`...qkv_proj[q]`) is its module (`...qkv_proj`): a rule written
    for the module it sees in the model covers every part (a trailing `[letters]` in a glob is
    therefore read as a part, not as a character class).
    """
    name = _PART_SUFFIX.sub("", name)
    name = re.sub(r"#\d+$", "", name)  # a module called twice is reported as name#1, name#2
    parts = [p for p in name.split(".") if p not in _WRAPPER_PARTS]
    out = ".".join(parts)
    while out.startswith(PEFT_PREFIX):
        out = out[len(PEFT_PREFIX) :]
    out = _ADAPTER_SUFFIX.sub("", out)
    while out.endswith(BASE_LAYER_SUFFIX):
        out = out[: -len(BASE_LAYER_SUFFIX)]
    return out


def module_of_param(param_path: str) -> str:
    """``model.layers.0.q_proj.base_layer.weight`` -> ``model.layers.0.q_proj``."""
    module, _, _ = param_path.rpartition(".")
    return normalize_module_name(module)
