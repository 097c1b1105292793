"""The code's size budgets, measured: files over ``MAX_FILE_LINES`` lines and functions over
``MAX_FUNCTION_LINES`` lines (their docstring not counted) in the product, lines wider than
``MAX_WIDTH`` columns and backslash line continuations anywhere, and the quickstart pipeline's
leaves. A module or function may exceed its budget when its docstring says why in a line starting
with ``Size:``. ``tests/sanity/test_budgets.py`` enforces them; ``python -m tests.sanity.budgets [ROOT]``
prints a tree's numbers."""

from __future__ import annotations

import ast
import io
import sys
import tokenize
from pathlib import Path

import yaml

PRODUCT = ("orchestrator", "actors", "pipelines", "deploy", "k8s")
EVERYWHERE = (*PRODUCT, "tests", "bench")
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60
MAX_WIDTH = 120  # ruff's line-length (pyproject.toml), E501 on
MAX_QUICKSTART_LEAVES = 100
REASON = "Size:"


def python_files(root: Path, packages: tuple[str, ...]) -> list[Path]:
    return [p for package in packages for p in sorted((root / package).rglob("*.py"))]


def _has_reason(node: ast.AST) -> bool:
    doc = ast.get_docstring(node) if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef)) else None
    return bool(doc) and any(line.strip().startswith(REASON) for line in doc.splitlines())


def _body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """A function's lines from its ``def`` to its end, its docstring left out."""
    lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        lines -= first.end_lineno - first.lineno + 1  # type: ignore[operator]
    return lines


def oversized(root: Path) -> tuple[list[str], list[str]]:
    """(files over budget, functions over budget) of the product without a ``Size:`` reason, each
    ``path (lines)`` or ``path:function (lines)``."""
    files, functions = [], []
    for path in python_files(root, PRODUCT):
        text = path.read_text()
        tree = ast.parse(text)
        name = path.relative_to(root)
        count = len(text.splitlines())
        if count > MAX_FILE_LINES and not _has_reason(tree):
            files.append(f"{name} ({count})")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                size = _body_lines(node)
                if size > MAX_FUNCTION_LINES and not _has_reason(node):
                    functions.append(f"{name}:{node.name} ({size})")
    return files, functions


def continuations(text: str) -> list[int]:
    """Lines ending in a backslash line continuation (an explicit join: no NL token before the next
    token on a later line; a comment or a string's backslash is not one)."""
    found, last = [], None
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type in (tokenize.NL, tokenize.NEWLINE):
            last = None
        elif tok.type not in (tokenize.INDENT, tokenize.DEDENT, tokenize.COMMENT, tokenize.ENDMARKER):
            if last is not None and tok.start[0] > last.end[0]:
                found.append(last.end[0])
            last = tok
    return found


def wide_lines(root: Path) -> list[str]:
    return [f"{p.relative_to(root)}:{i}" for p in python_files(root, EVERYWHERE)
            for i, line in enumerate(p.read_text().splitlines(), 1) if len(line) > MAX_WIDTH]


def backslashes(root: Path) -> list[str]:
    return [f"{p.relative_to(root)}:{line}" for p in python_files(root, EVERYWHERE)
            for line in continuations(p.read_text())]


def leaves(value: object) -> int:
    """Scalars in a YAML document (every value a user wrote)."""
    if isinstance(value, dict):
        return sum(leaves(v) for v in value.values())
    if isinstance(value, list):
        return sum(leaves(v) for v in value)
    return 1


def quickstart_leaves(root: Path) -> int:
    return leaves(yaml.safe_load((root / "pipelines" / "quickstart.yaml").read_text()))


def summary(root: Path) -> str:
    files, functions = oversized(root)
    return "\n".join([
        f"files over {MAX_FILE_LINES} lines without a reason: {len(files)} {files}",
        f"functions over {MAX_FUNCTION_LINES} lines (docstrings left out) without a reason: {len(functions)} "
        f"{functions}",
        f"lines over {MAX_WIDTH} columns: {len(wide_lines(root))}",
        f"backslash continuations: {len(backslashes(root))} {backslashes(root)}",
        f"quickstart.yaml leaves: {quickstart_leaves(root)}",
    ])


if __name__ == "__main__":
    print(summary(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2]))
