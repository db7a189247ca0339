"""The house rules, checked: import directions, no cycles, module sizes, and a README that matches the code.

Why a test: a layout stays a layout only while something fails when it drifts. Imports are read
from the source (``ast``), module-level and deferred (inside functions) alike, so a late import
cannot hide a cycle or a wrong-way arrow.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "sparselora_fx"
MAX_MODULE_LINES = 700

#: Compile time: what runs while torch.compile builds a graph (the passes and their lowering).
COMPILE_TIME = ("sparselora_fx.passes",)
#: Run time: what executes inside a compiled step.
RUN_TIME = ("sparselora_fx.runtime",)
#: The user's policy: read at compile time, imports neither half.
POLICY = ("sparselora_fx.policy",)


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(current: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = current.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (``from x import y`` counts y when y is a module)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                if t.startswith(("sparselora_fx", "studies")):
                    while t not in mods and "." in t:
                        t = t.rsplit(".", 1)[0]
                    if t != name:
                        graph[name].add(t)
    return graph


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _package_init_edges_only(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph without arrows into a package's own ``__init__`` from inside it (Python runs
    ``pkg/__init__`` before ``pkg.sub`` anyway; ``from . import x`` in a subpackage is no cycle)."""
    return {m: {t for t in ts if not (m.startswith(t + ".") and (PACKAGE / Path(*t.split(".")[1:]) / "__init__.py").exists())}
            for m, ts in graph.items()}


def test_no_import_cycle() -> None:
    cycles = _cycles(_package_init_edges_only(import_graph()))
    assert cycles == [], f"import cycles (module-level and deferred imports alike): {cycles}"


@pytest.mark.parametrize("source, forbidden, why", [
    (RUN_TIME, COMPILE_TIME + ("sparselora_fx.backend", "sparselora_fx.settings", "sparselora_fx.explain",
                               "sparselora_fx.cli", "sparselora_fx.report"),
     "run time must not reach back into compile time"),
    (POLICY, COMPILE_TIME + RUN_TIME + ("sparselora_fx.backend",), "the policy is plain configuration"),
    (("sparselora_fx",), ("studies",), "the library must not import the studies"),
])
def test_imports_run_one_way(source: tuple[str, ...], forbidden: tuple[str, ...], why: str) -> None:
    bad = sorted((m, t) for m, ts in import_graph().items() if _under(m, source) for t in ts if _under(t, forbidden))
    assert bad == [], f"{why}: {bad}"


def test_every_module_is_under_the_size_limit() -> None:
    sizes = {m: len(p.read_text(encoding="utf-8").splitlines()) for m, p in _modules().items()}
    big = {m: n for m, n in sizes.items() if n > MAX_MODULE_LINES}
    assert big == {}, f"modules over {MAX_MODULE_LINES} lines: {big}"


def test_the_studies_are_not_in_the_package() -> None:
    names = {p.stem for p in PACKAGE.rglob("*.py")}
    assert not names & {"accuracy", "fidelity", "docstring_corpus"}
    assert (REPO / "studies" / "accuracy.py").is_file()


# ---- the README matches the code ------------------------------------------------------------------


def _readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def test_readme_pass_table_is_the_pipeline() -> None:
    from sparselora_fx.passes import PIPELINE

    rows = re.findall(r"^\| (\d+) \| `(\w+)` \|", _readme_section("What the backend does"), flags=re.M)
    assert [(int(i), name) for i, name in rows] == [(i, p.name) for i, p in enumerate(PIPELINE)]


def _layout_paths(block: str) -> set[str]:
    """The paths a layout block names: one entry per line, two spaces of indent per folder level,
    the entry (``name.py`` or ``folder/``) first, its description after it."""
    stack: list[str] = []
    paths: set[str] = set()
    for line in block.splitlines():
        m = re.match(r"^( *)(\S+)", line)
        if not m or not m.group(2).endswith(("/", ".py")):
            continue
        depth = len(m.group(1)) // 2
        stack[depth:] = [m.group(2)]
        paths.add("".join(stack).rstrip("/"))
    return paths


def test_readme_layout_names_every_module() -> None:
    """Every module and folder of the package and the studies appears in the README's layout, and nothing else."""
    listed = {p for p in _layout_paths(_readme_section("Layout").split("```")[1])
              if p.startswith(("sparselora_fx", "studies")) and not p.endswith("__init__.py")}
    actual: set[str] = set()
    for root in (PACKAGE, REPO / "studies"):
        actual |= {str(p.relative_to(REPO)) for p in root.rglob("*.py") if p.name != "__init__.py"}
        actual |= {str(p.parent.relative_to(REPO)) for p in root.rglob("__init__.py")}
    assert sorted(actual - listed) == [], "in the code but not in the README layout"
    assert sorted(listed - actual) == [], "in the README layout but not in the code"


def test_nothing_is_unpickled() -> None:
    """Files we read can come from anyone: no module of the library or the studies imports a
    pickle-based loader or calls ``torch.load`` (factor files are safetensors, the rest JSON/TOML)."""
    banned_modules = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
    found = []
    for root in (PACKAGE, REPO / "studies"):
        for path in root.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    found += [(path.name, a.name) for a in node.names if a.name.split(".")[0] in banned_modules]
                elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in banned_modules:
                    found.append((path.name, node.module))
                elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                      and node.func.attr == "load" and isinstance(node.func.value, ast.Name)
                      and node.func.value.id in {"torch", "np", "numpy"}):
                    found.append((path.name, f"{node.func.value.id}.load"))
    assert found == []


def test_every_test_the_guarantees_cite_exists() -> None:
    """The README's "What we guarantee" table names its tests; a renamed or deleted one fails here."""
    section = _readme_section("What we guarantee")
    cited: list[tuple[str, str]] = []
    for row in section.splitlines():
        current = None
        for path, name in re.findall(r"`(tests/[\w/]+\.py)?(?:::(\w+))?", row):
            current = path or current
            if current and name:
                cited.append((current, name))
            elif path and not name:
                assert (REPO / path).is_file(), path
    assert len(cited) >= 10
    missing = [(p, n) for p, n in cited
               if not re.search(rf"^def {n}\(", (REPO / p).read_text(encoding="utf-8"), flags=re.M)]
    assert missing == []
