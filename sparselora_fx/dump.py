"""Readable dumps of each graph before and after each pass, plus the report as JSON.

Written when ``dump_dir`` (or env ``SPARSELORA_DUMP_DIR``) is set; the same text goes out as
``TORCH_TRACE`` artifacts for tlparse whenever structured tracing is on.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from pathlib import Path
from typing import Any

from . import _compat

_GRAPH_IDS = itertools.count()


def graph_text(gm: Any) -> str:
    """The graph as Python-like code, subgraphs included."""
    try:
        return gm.print_readable(print_output=False, include_stride=False, include_device=False)
    except TypeError:  # older signature
        return gm.print_readable(print_output=False)


def atomic_write(path: Path, text: str) -> None:
    """Write via a temp file and rename, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def prepare_dump_dir(path: Path) -> None:
    """Create the folder ``path`` and prove it writable (a probe file, removed at once).

    Raises the ``OSError`` that says why not; ``Settings`` turns it into an OptionsError when the
    options are parsed, so an unusable folder never fails half-way through the passes.
    """
    path.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=path, prefix=".sparselora-probe.", suffix=".tmp")
    os.close(fd)
    os.unlink(probe)


class Dumper:
    """Called by ``run_pipeline`` before and after each pass."""

    def __init__(self, dump_dir: Path | None):
        self.dir = Path(dump_dir) if dump_dir else None
        self.graph_id = next(_GRAPH_IDS)

    def __call__(self, p: Any, ctx: Any, when: str) -> None:
        if when == "before" and not p.changes_graph and p.name != "find_units":
            return
        if when == "after" and not p.changes_graph:
            return
        name = f"graph{self.graph_id:03d}_{p.name}_{when}"
        text = None
        if self.dir is not None:
            text = graph_text(ctx.gm)
            self._write(f"{name}.txt", text)
        _compat.trace_artifact(name, lambda: text if text is not None else graph_text(ctx.gm))

    def write_report(self, report: Any) -> None:
        if self.dir is None:
            return
        self._write(f"graph{self.graph_id:03d}_report.json", report.to_json())
        self._write(f"graph{self.graph_id:03d}_report.txt", str(report))

    def _write(self, name: str, text: str) -> None:
        """One dump file; a failure (disk full, folder removed) is the user's to see, so it is raised.

        The OSError already names the file; the note only says which setting wrote it.
        """
        assert self.dir is not None
        try:
            atomic_write(self.dir / name, text)
        except OSError as err:
            err.add_note("sparselora: writing a graph dump (options['dump_dir'] or env SPARSELORA_DUMP_DIR); "
                         "free space there, choose another folder, or drop the setting")
            raise
