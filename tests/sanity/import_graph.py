"""The product's import graph: every import of every module (function-level and ``TYPE_CHECKING``
imports count), the layers, and the cycles. ``tests/sanity/test_layout.py`` enforces the rules;
``python -m tests.sanity.import_graph [ROOT]`` prints the graph's summary for a tree."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGES = ("orchestrator", "actors", "pipelines", "deploy", "k8s")

# Top to bottom: a module may import its own layer or one below, never one above. A module belongs to
# the layer with the longest matching prefix; package ``__init__`` files hold no imports.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("cli", ("orchestrator.cli",)),
    ("deploy", ("deploy", "k8s")),
    ("driver", ("orchestrator",)),
    ("stages", ("pipelines.stages",)),
    ("runtime", ("orchestrator.runtime",)),
    ("losses", ("pipelines.losses",)),
    ("roles", ("actors",)),
    ("data", ("pipelines.data", "pipelines.tasks", "pipelines.environments", "pipelines.benchmarks")),
    ("base", ("pipelines.algorithms", "pipelines.errors")),
)
LAYER_NAMES = tuple(name for name, _ in LAYERS)


def modules(root: Path) -> dict[str, Path]:
    """Dotted name → file of every product module under ``root``."""
    out = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imports(path: Path, known: set[str], *, anywhere: bool = True) -> set[str]:
    """The product modules ``path`` imports anywhere in its body (``from a.b import c`` is ``a.b.c``
    when that is a module, else ``a.b``), with the packages whose ``__init__`` each import runs.
    ``anywhere=False``: only the imports its top-level statements run when the module is imported
    (not those inside functions, e.g. a lazy module ``__getattr__``)."""
    found = set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree) if anywhere else tree.body:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # `import a.b.c` of a non-module attribute: its module
                name = name.rpartition(".")[0]
            while name:  # importing a.b.c runs the __init__ of a and of a.b first
                if name in known:
                    found.add(name)
                name = name.rpartition(".")[0]
    return found


def graph(root: Path) -> dict[str, set[str]]:
    mods = modules(root)
    return {name: imports(path, set(mods)) - {name} for name, path in mods.items()}


def layer_of(module: str) -> str | None:
    best, length = None, -1
    for name, prefixes in LAYERS:
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > length:
                best, length = name, len(prefix)
    return best


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def upward(edges: dict[str, set[str]]) -> list[str]:
    """Imports that point from a layer to one above it: ``a (layer) -> b (layer)``."""
    rank = {name: i for i, name in enumerate(LAYER_NAMES)}
    out = []
    for a, targets in sorted(edges.items()):
        for b in sorted(targets):
            if not edges.get(b) and any(m.startswith(b + ".") for m in edges):
                continue  # a package __init__ that imports nothing (run by every import below it)
            la, lb = layer_of(a), layer_of(b)
            if la and lb and rank[lb] < rank[la]:
                out.append(f"{a} ({la}) -> {b} ({lb})")
    return out


DOC_BEGIN = "<!-- modules by layer: generated by `python -m tests.sanity.import_graph --markdown`; do not edit -->"
DOC_END = "<!-- end of the generated table -->"


def layer_table(root: Path) -> str:
    """The modules of every layer as a markdown table, top layer first (what ``docs/architecture.md``
    holds between ``DOC_BEGIN`` and ``DOC_END``; ``tests/sanity/test_budgets.py`` checks it)."""
    by_layer: dict[str, list[str]] = {}
    for module, targets in graph(root).items():
        layer = layer_of(module)
        if layer is not None and (targets or not any(m.startswith(module + ".") for m in modules(root))):
            by_layer.setdefault(layer, []).append(module)
    rows = [f"| {name} | {', '.join(f'`{m}`' for m in sorted(by_layer.get(name, [])))} |" for name in LAYER_NAMES]
    return "\n".join(["| layer | modules |", "|---|---|", *rows])


def summary(root: Path) -> str:
    edges = graph(root)
    lines = [f"{len(edges)} modules, {sum(len(t) for t in edges.values())} imports between them"]
    by_layer: dict[str, list[str]] = {}
    for module in edges:
        by_layer.setdefault(layer_of(module) or "(no layer)", []).append(module)
    for name in (*LAYER_NAMES, "(no layer)"):
        if name in by_layer:
            lines.append(f"  {name:8s} {len(by_layer[name]):3d} modules")
    found = cycles(edges)
    lines.append(f"cycles: {len(found)}" + "".join(f"\n  {' <-> '.join(c)}" for c in found))
    up = upward(edges)
    lines.append(f"imports pointing up a layer: {len(up)}" + "".join(f"\n  {u}" for u in up))
    return "\n".join(lines)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--markdown"]
    tree = Path(args[0]) if args else Path(__file__).resolve().parents[2]
    print(layer_table(tree) if "--markdown" in sys.argv else summary(tree))
