"""Module names as policies match them: layer indices, pattern spellings, per-layer stacks.

Why its own module: a rule's `match` patterns are written against the names a user sees in the
transformers model, while the graph passes see PEFT / compile spellings and, in per-layer
compiles, names without a layer index. Everything that turns a module name into what a rule
compares it with lives here; `Rule` and `Policy` (policy/model.py) only ask.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from fnmatch import fnmatchcase
from typing import Any

from ..errors import PolicyError
from ..names import BASE_LAYER_SUFFIX as _BASE_LAYER_SUFFIX
from ..names import PEFT_PREFIX as _PEFT_PREFIX
from ..names import normalize_module_name

__all__ = [
    "DEFAULT_LAYER_STACK",
    "layer_index",
    "normalize_module_name",
    "pattern_admits_layer",
    "pattern_head",
    "pattern_layer_stack",
    "regex_hazard",
]

def layer_index(name: str) -> int | None:
    """The layer index of a module: its first purely numeric dotted component, or None.

    Why: `layers` selectors and depth ramps need a layer number; in transformers models the
    decoder stack is the first numbered container (`model.layers.3...`, `transformer.h.3...`).
    """
    for part in normalize_module_name(name).split("."):
        if part.isdigit():
            return int(part)
    return None


def _prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _candidates(normalized: str) -> list[str]:
    """Every spelling of a name (and its parents) a pattern may be written against."""
    prefixes = _prefixes(normalized)
    cands = list(prefixes)
    cands += [_PEFT_PREFIX + p for p in prefixes]
    cands += [normalized + _BASE_LAYER_SUFFIX, _PEFT_PREFIX + normalized + _BASE_LAYER_SUFFIX]
    return cands


@functools.lru_cache(maxsize=1024)
def _compile_pattern(pattern: str) -> tuple[str, Any]:
    """('re', compiled) for `re:` patterns, ('glob', normalized) or ('exact', normalized).

    Compiled once per pattern (cached); a regex that could backtrack without bound on a module
    name (`regex_hazard`) raises PolicyError here, so no rule holding one is ever built.
    """
    if pattern.startswith("re:"):
        compiled = re.compile(pattern[3:])
        hazard = regex_hazard(pattern[3:])
        if hazard is not None:
            raise PolicyError(
                f"match {pattern!r} could take for ever to test against a module name: {hazard}. "
                "Write it without repeating a repeat: a glob (`model.layers.*.mlp`), a regex with one "
                "repeat per gap and literal dots (`re:model\\.layers\\.\\d+\\.mlp`), or a list of "
                "alternatives (`re:model\\.layers\\.(1|2|3)\\.mlp`)."
            )
        return "re", compiled
    if any(ch in pattern for ch in "*?["):
        return "glob", normalize_module_name(pattern)
    return "exact", normalize_module_name(pattern)


def _pattern_matches(pattern: str, normalized: str, cands: Sequence[str] | None = None) -> bool:
    how, pat = _compile_pattern(pattern)
    if how == "re":
        return any(pat.fullmatch(c) for c in (cands if cands is not None else _candidates(normalized)))
    prefixes = _prefixes(normalized)
    if how == "exact":
        return pat in prefixes
    return any(fnmatchcase(p, pat) for p in prefixes)


# --------------------------------------------------------------------------------------------
# Per-layer compiles: names without a layer index, read as the names of one layer
# --------------------------------------------------------------------------------------------

#: The layer stack a per-layer unit is placed in when no match pattern names one.
DEFAULT_LAYER_STACK = "layers"
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_INDEX_SAMPLES = tuple(str(n) for n in range(128))


@functools.lru_cache(maxsize=1024)
def pattern_layer_stack(pattern: str) -> str | None:
    """The module path a pattern puts before a layer index, or None when it names no layer.

    Why: a per-layer compile sees `mlp.gate_proj`, not `model.layers.3.mlp.gate_proj`; to match
    `model.layers.*.mlp` (or `re:model\\.layers\\.(1[4-9])\\.mlp`) the unit is read as
    `<stack>.<layer>.mlp.gate_proj` with the stack the policy itself writes (`model.layers`).
    """
    if pattern.startswith("re:"):
        parts = re.split(r"\\?\.", pattern[3:])
        is_index = _regex_matches_an_index
    else:
        parts = normalize_module_name(pattern).split(".")
        is_index = _glob_matches_an_index
    stack: list[str] = []
    for part in parts:
        if _IDENTIFIER.fullmatch(part):
            stack.append(part)
            continue
        return ".".join(stack) if stack and is_index(part) else None
    return None


def _glob_matches_an_index(part: str) -> bool:
    return part.isdigit() or any(fnmatchcase(n, part) for n in _INDEX_SAMPLES)


def _regex_matches_an_index(part: str) -> bool:
    try:
        compiled = re.compile(part)
    except re.error:  # a component cut out of a larger group: not a layer slot we can read
        return False
    return any(compiled.fullmatch(n) for n in _INDEX_SAMPLES)



# --------------------------------------------------------------------------------------------
# What a pattern commits to: its literal head and the layers its index slot admits
# --------------------------------------------------------------------------------------------

_GLOB_WILD = frozenset("*?[")
_REGEX_STOP = frozenset("|()[]{}*+?^$.\\")


def pattern_head(pattern: str) -> tuple[str, ...]:
    """The module path a pattern names before its first wildcard or layer index, as components.

    Why: a rule's match can only ever select modules under this path, whatever graph or layer is
    compiled; `model.layer.*.mlp` -> (`model`, `layer`), `re:model\\.layers\\.(1|2)\\.mlp` ->
    (`model`, `layers`), `model.layers.3.mlp` -> (`model`, `layers`) (a layer index may be in
    another graph), `*.mlp` -> (). A component cut by a wildcard (`model.layer*`) is left out;
    a regex with a top-level alternation commits to nothing (). PEFT / compile spellings are
    normalised away.
    """
    if pattern.startswith("re:"):
        parts = _regex_literal_components(pattern[3:])
    else:
        parts = []
        for part in normalize_module_name(pattern).split("."):
            if not part or any(ch in _GLOB_WILD for ch in part):
                break
            parts.append(part)
    head: list[str] = []
    for part in parts:
        if part.isdigit():  # a layer index: other layers may live in another graph
            break
        head.append(part)
    if not head:
        return ()
    return tuple(p for p in normalize_module_name(".".join(head)).split(".") if p)


def _regex_literal_components(source: str) -> list[str]:
    """The complete dotted components a regex spells out literally before anything else."""
    if _top_level_alternation(source):
        return []
    source = source.removeprefix("^")
    parts: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(source):
        ch = source[i]
        if source.startswith("\\.", i):
            parts.append("".join(current))
            current = []
            i += 2
            continue
        if ch in _REGEX_STOP or not (ch.isalnum() or ch == "_"):
            return [p for p in parts if p]  # `current` is cut short: not a whole component
        current.append(ch)
        i += 1
    if current:
        parts.append("".join(current))
    return [p for p in parts if p]


def _top_level_alternation(source: str) -> bool:
    depth, i, in_class = 0, 0, False
    while i < len(source):
        ch = source[i]
        if ch == "\\":
            i += 2
            continue
        if in_class:
            in_class = ch != "]"
        elif ch == "[":
            in_class = True
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "|" and depth == 0:
            return True
        i += 1
    return False


def pattern_admits_layer(pattern: str, index: int) -> bool | None:
    """Whether a pattern's layer slot can be layer `index`; None when it names no layer slot.

    Why: `model.layers.50.mlp` or `re:model\\.layers\\.(1[4-9])\\.mlp` select nothing in a
    4-layer model; the slot is the component after the stack `pattern_layer_stack` reads.
    """
    stack = pattern_layer_stack(pattern)
    if stack is None:
        return None
    n = len(stack.split("."))
    if pattern.startswith("re:"):
        parts = re.split(r"\\?\.", pattern[3:])
        try:
            compiled = re.compile(parts[n])
        except (re.error, IndexError):
            return None
        return compiled.fullmatch(str(index)) is not None
    parts = normalize_module_name(pattern).split(".")
    if len(parts) <= n:
        return None
    slot = parts[n]
    return slot == str(index) or fnmatchcase(str(index), slot)


# --------------------------------------------------------------------------------------------
# Vetting `re:` patterns: none may backtrack without bound on a module name
# --------------------------------------------------------------------------------------------

#: Unbounded repeats that can each run across a `.` (`.*`, `[^x]+`, `\S*`) a pattern may hold:
#: n such repeats in a row try every split of the name into n parts before failing, O(len^n);
#: three cost well under a millisecond on a 100-character name, five a quarter of a second.
MAX_WIDE_REPEATS = 3
_UNBOUNDED = 64  # a repeat allowed more times than a module name has characters to spare


def regex_hazard(source: str) -> str | None:
    """Why the regex `source` may take for ever to fail on a module name, or None.

    Why: Python's `re` backtracks; `(.*.*...)*x` (a repeated group that itself holds an
    unbounded repeat), `(.|.)*x` (a repeated alternation whose branches match the same text)
    and long runs of `.*` try exponentially or high-polynomially many ways to split a name, so
    `resolve()` never returns. Policies are data from files: such patterns are refused when
    the policy is loaded. The check reads re's own parse tree (`_parse_regex`) and falls back
    to a textual check where that parser is not available.
    """
    tree = _parse_regex(source)
    if tree is None:
        return _textual_hazard(source)
    wide = [0]
    hazard = _tree_hazard(list(tree), wide)
    if hazard is None and wide[0] > MAX_WIDE_REPEATS:
        hazard = (f"it holds {wide[0]} unbounded repeats that can each run across a `.` (like `.*`); "
                  f"more than {MAX_WIDE_REPEATS} try too many ways to split a name")
    return hazard


def _parse_regex(source: str) -> Any:
    """re's parse tree of `source` (a list of (opcode, argument) pairs), or None without a parser.

    Version note: the parser is CPython's private `re._parser` (3.11+; `sre_parse` before, kept
    as a deprecated alias until 3.13). Its tree (opcodes named as in `re._constants`) has kept
    this shape since Python 2; if it moves or changes, `regex_hazard` uses `_textual_hazard`.
    """
    try:
        from re import _parser as parser
    except ImportError:  # pragma: no cover - Python < 3.11, or the module moved
        try:
            import sre_parse as parser  # type: ignore[no-redef]
        except ImportError:
            return None
    try:
        return parser.parse(source)
    except re.error:
        raise
    except Exception:  # pragma: no cover - the private parser changed: use the heuristic
        return None


def _op(op: Any) -> str:
    return str(getattr(op, "name", op))


def _children(op: str, av: Any) -> list[list[Any]]:
    """The sub-patterns of one parse-tree item (empty for a single-character item)."""
    if op in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
        return [list(av[2])]
    if op == "SUBPATTERN":
        return [list(av[-1])]
    if op == "BRANCH":
        return [list(b) for b in av[1]]
    if op == "ATOMIC_GROUP":
        return [list(av)]
    if op in ("ASSERT", "ASSERT_NOT"):
        return [list(av[1])]
    if op == "GROUPREF_EXISTS":
        return [list(b) for b in av[1:] if b is not None]
    return []


def _holds_unbounded(items: list[Any]) -> bool:
    for op, av in items:
        name = _op(op)
        if name in ("MAX_REPEAT", "MIN_REPEAT") and av[1] > _UNBOUNDED:
            return True
        if any(_holds_unbounded(child) for child in _children(name, av)):
            return True
    return False


def _crosses_dot(items: list[Any]) -> bool:
    """Whether a repeated body can match a `.` (so the repeat can range over the whole name)."""
    dot = ord(".")
    for op, av in items:
        name = _op(op)
        if name == "ANY" or (name == "LITERAL" and av == dot) or (name == "NOT_LITERAL" and av != dot):
            return True
        if name == "IN":
            negated = any(_op(o) == "NEGATE" for o, _ in av)
            has_dot = any(
                (_op(o) == "LITERAL" and a == dot) or (_op(o) == "RANGE" and a[0] <= dot <= a[1])
                or (_op(o) == "CATEGORY" and _op(a) in ("CATEGORY_NOT_WORD", "CATEGORY_NOT_DIGIT",
                                                         "CATEGORY_NOT_SPACE"))
                for o, a in av
            )
            if has_dot != negated:
                return True
        if any(_crosses_dot(child) for child in _children(name, av)):
            return True
    return False


def _literal_prefix(items: list[Any]) -> str | None:
    """The literal text a branch starts with; None when it starts with anything else."""
    out = []
    for op, av in items:
        if _op(op) != "LITERAL":
            break
        out.append(chr(av))
    return "".join(out) or None


def _branches_overlap(items: list[Any]) -> bool:
    """Whether some alternation directly in `items` has two branches that may match the same text."""
    for op, av in items:
        name = _op(op)
        if name == "BRANCH":
            heads = [_literal_prefix(list(b)) for b in av[1]]
            if any(h is None for h in heads):
                return True
            for i, a in enumerate(heads):
                if any(b.startswith(a) or a.startswith(b) for b in heads[i + 1 :]):
                    return True
        if name in ("SUBPATTERN", "ATOMIC_GROUP") and any(_branches_overlap(c) for c in _children(name, av)):
            return True
    return False


def _tree_hazard(items: list[Any], wide: list[int]) -> str | None:
    for op, av in items:
        name = _op(op)
        if name in ("MAX_REPEAT", "MIN_REPEAT"):
            hi, body = av[1], list(av[2])
            if hi > 1 and _holds_unbounded(body):
                return ("a repeated group holds another unbounded repeat (like `(.*)*`, `(a+)+` or "
                        "`(.*.*...)*`): the two repeats can split a name in exponentially many ways")
            if hi > 1 and _branches_overlap(body):
                return ("a repeated group's alternatives can match the same text (like `(.|.)*` or "
                        "`(a|ab)*`): repeating it can split a name in exponentially many ways")
            if hi > _UNBOUNDED and _crosses_dot(body):
                wide[0] += 1
        for child in _children(name, av):
            hazard = _tree_hazard(child, wide)
            if hazard is not None:
                return hazard
    return None


_NESTED_TEXT = re.compile(r"\((?:[^()\\]|\\.)*(?<!\\)[*+}](?:[^()\\]|\\.)*\)[*+{]")
_WIDE_TEXT = re.compile(r"(?<!\\)(?:\.|\[\^[^\]]*\]|\\[SWD])[*+]")


def _textual_hazard(source: str) -> str | None:
    """The fallback check without re's parser: a quantified group with a quantifier inside it."""
    if _NESTED_TEXT.search(source):
        return ("a repeated group holds another repeat (like `(.*)*` or `(a+)+`): the two repeats "
                "can split a name in exponentially many ways")
    n = len(_WIDE_TEXT.findall(source))
    if n > MAX_WIDE_REPEATS:
        return (f"it holds {n} unbounded repeats that can each run across a `.` (like `.*`); more "
                f"than {MAX_WIDE_REPEATS} try too many ways to split a name")
    return None
