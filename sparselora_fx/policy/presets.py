"""The bundled presets: named policy files shipped in sparselora_fx/presets/*.toml.

`Policy.preset(name)` / `Policy.preset_names()` (policy/model.py) delegate here, handing over
the class to build; a preset is read once (parsed by its `from_toml_text`) and the same
immutable Policy is returned after.
"""

from __future__ import annotations

import difflib
import functools
import importlib.resources
from typing import Any

from ..errors import PolicyError

__all__ = ["preset", "preset_names"]


def _presets_dir() -> Any:
    return importlib.resources.files("sparselora_fx").joinpath("presets")


@functools.lru_cache(maxsize=1)
def _preset_names() -> list[str]:
    names = [e.name[: -len(".toml")] for e in _presets_dir().iterdir() if e.name.endswith(".toml")]
    return sorted(names)


def preset_names() -> list[str]:
    """Names of the bundled presets (files in sparselora_fx/presets/)."""
    return _preset_names()


@functools.lru_cache(maxsize=None)
def _load_preset(cls: Any, name: str) -> Any:
    text = _presets_dir().joinpath(f"{name}.toml").read_text(encoding="utf-8")
    return cls.from_toml_text(text, source=f"preset {name!r}")


def preset(cls: Any, name: str) -> Any:
    """The bundled preset `name` as a `cls` (a Policy); unknown names list the available ones."""
    names = _preset_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise PolicyError(
            f"unknown policy preset {name!r}.{hint} Available presets: {', '.join(names)}."
        )
    return _load_preset(cls, name)
