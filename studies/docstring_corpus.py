"""The accuracy study's text: sentences of stdlib docstrings, by object (stdlib imports only).

Why a module of its own with no package imports: what `dir(module)` shows depends on what the
interpreter imported before (importing torch or transformers pulls in stdlib submodules and
re-exports), so `accuracy.stdlib_objects` runs this file as a script in a fresh isolated
interpreter (`python -I`) and the corpus depends only on the Python build.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import sys
import warnings
from collections.abc import Sequence

#: Stdlib modules left out of the corpus: GUI / demo / packaging modules (import side effects).
SKIP_MODULES = frozenset({"this", "antigravity", "idlelib", "turtledemo", "tkinter", "turtle",
                          "pydoc_data", "lib2to3", "ensurepip", "venv",
                          # setuptools' import hook swaps in its own copy inside virtual environments
                          "distutils"})
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z(`'\"])")
MIN_CHARS, MAX_CHARS = 20, 400


def sentences(text: str) -> list[str]:
    """The sentences of a docstring (whitespace collapsed) that are 20 to 400 characters long."""
    flat = " ".join(inspect.cleandoc(text).split())
    return [s for s in _SENTENCE.split(flat) if MIN_CHARS <= len(s) <= MAX_CHARS]


def docstring_objects(modules: Sequence[str] | None = None) -> dict[str, list[list[str]]]:
    """Object name -> its docstrings as sentence lists (those with at least two sentences).

    Objects: each importable stdlib module's own docstring, and every public class or function
    it defines (a class together with its public methods' docstrings). Sorted; deterministic for
    one Python build when run in a fresh interpreter (see the module docstring).
    """
    names = sorted(m for m in (modules or sys.stdlib_module_names)
                   if not m.startswith("_") and m not in SKIP_MODULES)
    out: dict[str, list[list[str]]] = {}
    for name in names:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = importlib.import_module(name)
        except BaseException:  # noqa: BLE001 - platform-specific modules fail in many ways
            continue
        mod_doc = sentences(mod.__doc__ or "")
        if len(mod_doc) >= 2:
            out[name] = [mod_doc]
        for attr in sorted(dir(mod)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # deprecated aliases (typing.io) warn on access
                obj = getattr(mod, attr, None) if not attr.startswith("_") else None
            if not (inspect.isclass(obj) or inspect.isroutine(obj)):
                continue
            if (getattr(obj, "__module__", None) or "").split(".")[0] != name:
                continue  # re-exported from elsewhere
            docs = [obj.__doc__ or ""]
            if inspect.isclass(obj):
                docs += [getattr(v, "__doc__", None) or "" for k, v in sorted(vars(obj).items())
                         if not k.startswith("_")
                         and (inspect.isroutine(v) or isinstance(v, (classmethod, staticmethod, property)))]
            seqs = [s for s in (sentences(d) for d in docs) if len(s) >= 2]
            if seqs:
                out[f"{name}.{attr}"] = seqs
    return out


if __name__ == "__main__":
    # Importing modules may print; the JSON goes to the real stdout only at the end.
    real_stdout, sys.stdout = sys.stdout, sys.stderr
    corpus = docstring_objects()
    sys.stdout = real_stdout
    json.dump(corpus, sys.stdout, sort_keys=True)
