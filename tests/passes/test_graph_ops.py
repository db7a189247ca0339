"""One op table: every pass reads torch targets from ``passes.graph_ops``, never from a copy of its own."""

from __future__ import annotations

import ast
import operator
import re
from pathlib import Path

import torch
from torch.fx import Interpreter, symbolic_trace

import sparselora_fx.passes as passes_pkg
from sparselora_fx.passes import graph_ops as ops
from sparselora_fx.passes.analyse.units import last_dim_piece

PASSES = Path(passes_pkg.__file__).parent
TABLE_NAME = re.compile(r"^_?[A-Z0-9_]*(_FNS|_METHODS)$")
# The token pass's own walk tables (which ops a label / logit tensor may pass through on its way
# to the loss): chosen for that walk, not a torch-op family another pass could share.
ALLOWED = {"tokens.py": {"CROSS_ENTROPY_FNS", "_LABEL_FNS", "_LABEL_METHODS", "_LOGIT_METHODS"}}


def _module_level_tables(text: str) -> list[str]:
    """Module-level names that look like an op table: ``*_FNS`` / ``*_METHODS``, or any set literal."""
    found = []
    for stmt in ast.parse(text).body:
        if isinstance(stmt, ast.Assign):
            targets, value = stmt.targets, stmt.value
        elif isinstance(stmt, ast.AnnAssign):
            targets, value = [stmt.target], stmt.value
        else:
            continue
        is_set = isinstance(value, (ast.Set, ast.SetComp)) or (
            isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id in ("set", "frozenset"))
        found += [t.id for t in targets if isinstance(t, ast.Name) and (TABLE_NAME.match(t.id) or is_set)]
    return found


def test_no_pass_keeps_a_private_op_table():
    offenders = []
    for path in sorted(PASSES.rglob("*.py")):
        rel = str(path.relative_to(PASSES))
        if rel == "graph_ops.py":
            continue
        offenders += [f"{rel}: {name}" for name in _module_level_tables(path.read_text())
                      if name not in ALLOWED.get(rel, set())]
    assert not offenders, f"op tables belong in passes/graph_ops.py, found copies: {offenders}"


def test_the_checker_sees_a_copy():
    text = 'import torch\nSPLIT_FNS = {torch.chunk}\n_KINDS: set = {"view"}\nROLES = ("q", "k")\nN = 3\n'
    assert _module_level_tables(text) == ["SPLIT_FNS", "_KINDS"]


def test_distinct_tables_are_nested_families():
    # unbind drops the split dim, so units.last_dim_piece (which reads piece bounds) must not see it
    assert torch.unbind not in ops.SPLIT_FNS and "unbind" not in ops.SPLIT_METHODS
    assert ops.SPLIT_FNS_WITH_UNBIND == ops.SPLIT_FNS | {torch.unbind}
    assert ops.SPLIT_METHODS_WITH_UNBIND == ops.SPLIT_METHODS | {"unbind"}
    # Conv1D's matcher keeps to view/reshape; the attention walks also follow flatten/unflatten
    assert ops.RESHAPE_FNS < ops.VIEW_FNS and ops.RESHAPE_METHODS < ops.VIEW_METHODS
    assert operator.truediv in ops.DIV_FNS and "__truediv__" in ops.DIV_METHODS


def _traced(fn, *args):
    """``fn`` traced, with each node's value recorded as Dynamo would (``example_value``)."""
    gm = symbolic_trace(fn)

    class Record(Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            n.meta["example_value"] = out
            return out

    Record(gm).run(*args)
    return gm


def _getitems(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.getitem]


def test_last_dim_piece_reads_splits_but_not_unbind():
    x = torch.randn(2, 3, 8)
    split = _traced(lambda t: t.split(4, -1)[1], x)
    (piece,) = _getitems(split)
    assert last_dim_piece(piece)[1:3] == (4, 8)
    unbind = _traced(lambda t: t.unbind(-1)[1], x)
    (item,) = _getitems(unbind)
    assert last_dim_piece(item) is None


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports from, relative imports spelled with their dots (``..groups``)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):  # walks into TYPE_CHECKING blocks too
        if isinstance(node, ast.ImportFrom):
            out.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_analysis_imports_flow_one_way():
    analyse = PASSES / "analyse"
    assert not {m for m in _imports(analyse / "units.py") if m.endswith("groups") or "attention" in m}
    assert not {m for m in _imports(analyse / "groups.py") if "attention" in m}
    attn = analyse / "attention"
    assert not {m for m in _imports(attn / "common.py") if m in (".layout", ".qk", ".vo")}
    assert not {m for m in _imports(attn / "layout.py") if m in (".qk", ".vo")}
    assert ".vo" not in _imports(attn / "qk.py") and ".qk" not in _imports(attn / "vo.py")
