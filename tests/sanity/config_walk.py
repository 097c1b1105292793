"""The path of a stage's config from its ``run`` to the loss, by static analysis (``ast``; the product is not
imported): the modules it passes, how often it climbs back up a layer (``import_graph``), returns to modules already
left and is renamed, for any tree (compare one before and after a refactor): ``python -m tests.sanity.config_walk
[ROOT] [--kind ppo] [--trace] [--json]``. The walk, fixed so that numbers compare:

1. Index of each product module that parses: top-level functions; classes (methods, annotated fields, bases resolved
   through imports too); import bindings anywhere in it (relative ones; re-exports followed).
2. Start at ``run`` of ``pipelines.stages.<kind>``, its first parameter tracked.
3. TRACKED: a tracked name; an attribute chain or subscript rooted at one; ``p.stage`` of a parameter ``p`` named
   ``ctx`` or annotated ``StageContext``; ``c.attr`` where carrier ``c``'s class or a base stores a tracked value in
   ``attr``. Assignments (``=``, annotated, ``:=``, ``for``/comprehension targets; tuples pairwise) of tracked
   values track their targets (a flow-insensitive fixed point per function); a target other than the source's ROOT
   NAME (of ``cfg.a[0]``: ``cfg``; of ``self.cfg.a``: ``cfg``; of ``ctx.stage.a``: ``stage``) is a RENAME.
4. CARRIERS: ``C(...)`` of a tree class with a tracked argument; names, parameters and attributes given one. A
   method call on a carrier resolves along the MRO (left to right, depth first; ``super().m()`` too) with ``self``
   the carrier; one on a parameter annotated with a tree class (``X``, ``"X"``, ``X | None``; a method's ``self``:
   its class) on that class.
5. A call is FOLLOWED when an argument (positional, keyword, starred) is tracked or a carrier, or its receiver is a
   carrier, and it resolves to tree code: a function or class of the module, an imported name, ``module.f``,
   ``Class.method``, a method as in 4 (other calls are ignored). A class goes into its ``__init__`` (``self`` a
   carrier when an argument is tracked); one without (dataclass, pydantic model) is a leaf visit of its module, its
   fields storing the tracked values and carriers they receive. Lambdas and nested functions are part of their
   function. A parameter given a tracked argument of another root name is a RENAME; a carrier never is.
6. Depth first, in source order of the call sites; a function is expanded once per set of tracked parameters
   (carriers with their class), later calls still visit it; no descent below depth 40. Walks repeat until the stored
   attributes (read in other methods) stop growing; the last counts.
7. TRACE: the start's module, then on each followed call the callee's module and after it the caller's (each unless
   already last). ``modules``: distinct ones; ``climbs``: calls whose callee's layer is above the caller's;
   ``returns``: entries whose module is earlier in the trace (so every return to a caller in another module;
   ``returns_on_call``: those a call reached); ``renames``: 3 and 5; ``calls_followed`` (leaf, repeated visits too).
   SPINE: the first call-tree path (depth first) from ``run`` to ``pipelines.losses`` or a name containing ``loss``.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tests.sanity.import_graph import LAYER_NAMES, layer_of, modules

MAX_DEPTH = 40
TRACKED = "tracked"  # the value of a tracked expression; a carrier's value is its class (a ``Cls``)
RANK = {name: i for i, name in enumerate(LAYER_NAMES)}
FUNCS = (ast.FunctionDef, ast.AsyncFunctionDef)
CLASS_PATH = re.compile(r":[\w.]+\.")  # a carrier's class in the call tree: its name only


@dataclass(eq=False)
class Fn:
    """A function or method of the tree; ``label``: ``module.name`` or ``module.Class.name``."""
    module: str
    label: str
    node: ast.FunctionDef | ast.AsyncFunctionDef
    cls: Cls | None = None


@dataclass(eq=False)
class Cls:
    """A class of the tree; ``attrs``: attribute → ``TRACKED`` or a carrier's class, as walks store them."""
    module: str
    label: str
    node: ast.ClassDef
    methods: dict[str, Fn] = field(default_factory=dict)
    fields: list[str] = field(default_factory=list)
    bases: list[Cls] = field(default_factory=list)
    attrs: dict[str, object] = field(default_factory=dict)

    def mro(self) -> list[Cls]:
        """The class and its tree bases, left to right, depth first."""
        out: list[Cls] = []
        todo = [self]
        while todo and len(out) < 64:
            if (c := todo.pop()) not in out:
                out.append(c)
                todo += reversed(c.bases)
        return out

    def method(self, name: str, skip: int = 0) -> Fn | None:
        return next((c.methods[name] for c in self.mro()[skip:] if name in c.methods), None)

    def attr(self, name: str) -> object:
        return next((c.attrs[name] for c in self.mro() if name in c.attrs), None)


@dataclass
class Scope:
    """A function being walked: tracked names, parameters (→ annotation), local names, body nodes."""
    fn: Fn
    env: dict[str, object]
    params: dict[str, ast.expr | None]
    local: set[str]
    nodes: list[ast.AST]

    def is_stage(self, e: ast.expr) -> bool:
        """``p.stage`` of a parameter ``p`` named ``ctx`` or annotated with ``StageContext``."""
        p = e.value.id if isinstance(e, ast.Attribute) and e.attr == "stage" and isinstance(e.value, ast.Name) else ""
        return p in self.params and (p == "ctx" or "StageContext" in ast.unparse(self.params[p] or ast.Constant("")))

    def is_local(self, e: ast.expr) -> bool:
        """Whether the name ``e`` (or the one an attribute chain starts from) is local to the function."""
        while isinstance(e, (ast.Attribute, ast.Subscript)):
            e = e.value
        return isinstance(e, ast.Name) and e.id in self.local


def names(module: str, tree: ast.Module, package: str, known: set[str]) -> dict[str, object]:
    """Name → its ``Fn`` or ``Cls``, or for an import its (module, None) or (module, symbol)."""
    out: dict[str, object] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                out[a.asname or a.name.partition(".")[0]] = (a.name if a.asname else a.name.partition(".")[0], None)
        elif isinstance(node, ast.ImportFrom):
            base, parts = node.module or "", package.split(".")
            if node.level:  # relative to ``package``
                base = ".".join(p for p in [*parts[: max(0, len(parts) - node.level + 1)], base] if p)
            for a in node.names:
                full = f"{base}.{a.name}"
                out[a.asname or a.name] = (full, None) if full in known else (base, a.name)
    for node in tree.body:
        if isinstance(node, FUNCS):
            out[node.name] = Fn(module, f"{module}.{node.name}", node)
        elif isinstance(node, ast.ClassDef):
            cls = out[node.name] = Cls(module, f"{module}.{node.name}", node)
            for item in node.body:
                if isinstance(item, FUNCS):
                    cls.methods[item.name] = Fn(module, f"{cls.label}.{item.name}", item, cls)
                elif (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
                      and "ClassVar" not in ast.dump(item.annotation)):
                    cls.fields.append(item.target.id)
    return out


class Index:
    """Each module's names: its top-level functions and classes, and its import bindings."""

    def __init__(self, root: Path) -> None:
        found = modules(root)
        self.names: dict[str, dict[str, object]] = {}
        for name, path in found.items():
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, ValueError, OSError, RecursionError, MemoryError):
                continue
            package = name if path.name == "__init__.py" else name.rpartition(".")[0]  # for relative imports
            self.names[name] = names(name, tree, package, set(found))
        self.classes = [c for defs in self.names.values() for c in defs.values() if isinstance(c, Cls)]
        for cls in self.classes:
            cls.bases = [b for e in cls.node.bases if isinstance(b := self.lookup(cls.module, e), Cls) and b is not cls]

    def symbol(self, module: str, name: str, hops: int = 0) -> Fn | Cls | str | None:
        """What ``name`` is in ``module``: a function, a class, a module's dotted name, or None."""
        found = self.names.get(module, {}).get(name) if hops < 8 else None
        if isinstance(found, tuple):
            return found[0] if found[1] is None else self.symbol(*found, hops + 1)
        return found or (f"{module}.{name}" if f"{module}.{name}" in self.names else None)

    def lookup(self, module: str, expr: ast.expr) -> Fn | Cls | str | None:
        """A name or dotted expression in ``module`` (``f``, ``mod.f``, ``Class.method``) resolved."""
        if isinstance(expr, ast.Name):
            return self.symbol(module, expr.id)
        base = self.lookup(module, expr.value) if isinstance(expr, ast.Attribute) else None
        if isinstance(base, Cls):
            return base.method(expr.attr)
        if isinstance(base, str):
            return dotted if (dotted := f"{base}.{expr.attr}") in self.names else self.symbol(base, expr.attr)
        return None


def assignments(node: ast.AST) -> list[tuple[ast.expr, ast.expr]]:
    """(target, source) of an assignment-like node: a loop's targets get its iterable; tuples go pairwise
    when both sides are literal tuples of one length."""
    if isinstance(node, ast.Assign):
        todo = [(t, node.value) for t in node.targets]
    elif isinstance(node, (ast.For, ast.AsyncFor, ast.comprehension)):
        todo = [(node.target, node.iter)]
    elif isinstance(node, (ast.AnnAssign, ast.NamedExpr)):
        todo = [(node.target, node.value)]
    else:
        return []
    out = []
    while todo:
        target, value = todo.pop()
        if isinstance(target, ast.Starred):
            todo.append((target.value, value))
        elif isinstance(target, (ast.Tuple, ast.List)):
            same = isinstance(value, (ast.Tuple, ast.List)) and len(value.elts) == len(target.elts)
            todo += zip(target.elts, value.elts if same else [value] * len(target.elts))
        elif value is not None:
            out.append((target, value))
    return out


def labels(env: dict[str, object]) -> str:
    return ", ".join(sorted(k if v is TRACKED else f"{k}:{getattr(v, 'label', v)}" for k, v in env.items()))


class Walk:
    """One walk of the config from ``start`` (a ``run``): the trace, the counts and the call ``tree``, a
    list of (depth, label, tracked parameters, module, expanded before) in depth-first order."""

    def __init__(self, ix: Index, start: Fn) -> None:
        self.ix, self.done, self.climbs, self.renames, self.calls = ix, set(), [], 0, 0
        self.trace: list[tuple[str, str]] = [(start.module, "start")]  # (module, entered by: start, call, return)
        first = [p.arg for p in [*start.node.args.posonlyargs, *start.node.args.args]][:1]
        self.tree: list[tuple[int, str, str, str, bool]] = [(0, start.label, ", ".join(first), start.module, False)]
        self.expand(start, {first[0]: TRACKED} if first else {}, 0)

    def expand(self, fn: Fn, env: dict[str, object], depth: int) -> None:
        """Walk ``fn``'s followed calls in source order, unless it was expanded with these parameters."""
        if (fn.label, labels(env)) in self.done or depth >= MAX_DEPTH:
            return
        self.done.add((fn.label, labels(env)))
        s = self.scope(fn, env)
        for call in sorted((n for n in s.nodes if isinstance(n, ast.Call)), key=lambda c: (c.lineno, c.col_offset)):
            self.call(call, s, depth)

    def scope(self, fn: Fn, env: dict[str, object]) -> Scope:
        """The function's tracked names (a fixed point over its assignments); its renames are counted."""
        a = fn.node.args
        params = [*a.posonlyargs, *a.args, *a.kwonlyargs, *(x for x in (a.vararg, a.kwarg) if x)]
        nodes = [n for stmt in fn.node.body for n in ast.walk(stmt)]
        local = {n.id for n in nodes if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        local |= {n.arg for n in nodes if isinstance(n, ast.arg)} | {p.arg for p in params}
        local |= {n.name for n in nodes if isinstance(n, (*FUNCS, ast.ClassDef))}
        s = Scope(fn, dict(env), {p.arg: p.annotation for p in params}, local, nodes)
        found = [p for n in nodes for p in assignments(n)]
        for _ in range(12):
            if not any([self.assign(s, target, source) for target, source in found]):
                break
        for target, source in found:
            v, root = self.value(source, s)
            self.renames += isinstance(target, ast.Name) and v is TRACKED and target.id != root
        return s

    def assign(self, s: Scope, target: ast.expr, source: ast.expr) -> bool:
        """Track ``target`` (a name, or a carrier's attribute) when ``source`` is tracked or a carrier."""
        v = self.value(source, s)[0]
        if v is not None and isinstance(target, ast.Name) and target.id not in s.env:
            s.env[target.id] = v
            return True
        owner = self.value(target.value, s)[0] if v is not None and isinstance(target, ast.Attribute) else None
        if isinstance(owner, Cls) and owner.attr(target.attr) is None:
            owner.attrs[target.attr] = v
            return True
        return False

    def value(self, e: ast.expr, s: Scope) -> tuple[object, str | None]:
        """(``TRACKED``, a carrier's class or None; the root name: 3 of the module's docstring) of ``e``."""
        if isinstance(e, (ast.Starred, ast.NamedExpr, ast.keyword)):
            return self.value(e.value, s)
        if isinstance(e, ast.Name):
            return s.env.get(e.id), e.id
        if isinstance(e, (ast.Attribute, ast.Subscript)):
            base, root = (TRACKED, "stage") if s.is_stage(e) else self.value(e.value, s)
            if isinstance(base, Cls) and isinstance(e, ast.Attribute):
                return base.attr(e.attr), e.attr
            return (base if base is TRACKED else None), root
        if isinstance(e, ast.Call) and not s.is_local(e.func):
            cls = self.ix.lookup(s.fn.module, e.func)
            if isinstance(cls, Cls) and any(self.value(x, s)[0] is TRACKED for x in [*e.args, *e.keywords]):
                return cls, None
        return None, None

    def annotated(self, s: Scope, name: str) -> Cls | None:
        """The tree class parameter ``name`` is annotated with (a method's ``self``: its class)."""
        if (ann := s.params.get(name)) is None:
            return s.fn.cls if name == next(iter(s.params), None) and name in ("self", "cls") else None
        nodes: list[ast.expr] = list(ast.walk(ann))  # and the names in a string (forward reference)
        nodes += [ast.Name(w) for n in nodes if isinstance(n, ast.Constant) for w in re.findall(r"\w+", str(n.value))]
        return next((c for n in nodes if isinstance(c := self.ix.lookup(s.fn.module, n), Cls)), None)

    def callee(self, call: ast.Call, s: Scope) -> tuple[Fn | Cls, Cls | None, str] | None:
        """(function or class, the receiver when it is a carrier, how it is called) or None."""
        f = call.func
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Call) and getattr(f.value.func, "id", 0) == "super":
            me = s.env.get(next(iter(s.params), ""))
            m = s.fn.cls.method(f.attr, skip=1) if s.fn.cls else None
            return (m, me if isinstance(me, Cls) else None, "method") if m else None
        if isinstance(f, ast.Attribute) and isinstance(recv := self.value(f.value, s)[0], Cls):
            return (m, recv, "method") if (m := recv.method(f.attr)) else None
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and (cls := self.annotated(s, f.value.id)):
            return (m, None, "method") if (m := cls.method(f.attr)) else None
        t = None if s.is_local(f) else self.ix.lookup(s.fn.module, f)
        if isinstance(t, Fn):
            return t, None, ("static" if t.cls else "call")
        return (t, None, "new") if isinstance(t, Cls) else None

    def bind(self, fn: Fn, call: ast.Call, s: Scope, recv: Cls | None, kind: str) -> dict[str, object]:
        """The callee's tracked parameters; each one of another root name than its argument is a rename."""
        a, env = fn.node.args, {}
        pos = [p.arg for p in [*a.posonlyargs, *a.args]]
        decos = {getattr(d, "id", "") for d in fn.node.decorator_list}
        if pos and kind != "call" and ("classmethod" in decos if kind == "static" else "staticmethod" not in decos):
            me = pos.pop(0)
            env = {me: recv} if recv is not None else {}
        named = {*pos, *(p.arg for p in a.kwonlyargs)}
        vararg, kwarg = a.vararg and a.vararg.arg, a.kwarg and a.kwarg.arg
        slots = [(pos[i] if i < len(pos) else vararg, arg) for i, arg in enumerate(call.args)]
        for name, arg in slots + [(k.arg if k.arg in named else kwarg, k.value) for k in call.keywords]:
            v, root = self.value(arg, s)
            if name and v is not None:
                env.setdefault(name, v)
                self.renames += v is TRACKED and name != root
        return env

    def call(self, call: ast.Call, s: Scope, depth: int) -> None:
        """Follow ``call`` when it passes the config or a carrier on (5 of the module's docstring)."""
        hit = self.callee(call, s)
        values = [self.value(x, s)[0] for x in [*call.args, *call.keywords]]
        if hit is None or (hit[1] is None and all(v is None for v in values)):
            return
        target, recv, kind = hit
        if isinstance(target, Cls) and (init := target.method("__init__")) is None:
            fields = list(dict.fromkeys(f for c in reversed(target.mro()) for f in c.fields))  # a dataclass's
            for name, arg in [*zip(fields, call.args), *((k.arg, k.value) for k in call.keywords if k.arg)]:
                if (v := self.value(arg, s)[0]) is not None and target.attr(name) is None:
                    target.attrs[name] = v
        elif isinstance(target, Cls):
            target, recv = init, (target if TRACKED in values else None)
        env = self.bind(target, call, s, recv, kind) if isinstance(target, Fn) else {}
        self.calls += 1
        key = (target.label, labels(env))
        self.tree.append((depth + 1, *key, target.module, key in self.done))
        if target.module != self.trace[-1][0]:
            self.trace.append((target.module, "call"))
        up, down = layer_of(s.fn.module), layer_of(target.module)
        if up and down and RANK[down] < RANK[up]:
            self.climbs.append(f"{s.fn.label} -> {target.label} ({up} -> {down})")
        if isinstance(target, Fn):
            self.expand(target, env, depth + 1)
        if self.trace[-1][0] != s.fn.module:
            self.trace.append((s.fn.module, "return"))

    def numbers(self) -> dict[str, int]:
        """The summary numbers (7 of the module's docstring)."""
        modules = [m for m, _ in self.trace]
        returns = [how for i, (m, how) in enumerate(self.trace) if m in modules[:i]]
        return {"modules": len(set(modules)), "climbs": len(self.climbs), "returns": len(returns),
                "returns_on_call": returns.count("call"), "renames": self.renames, "calls_followed": self.calls}

    def spine(self) -> list[str]:
        """The first path of the call tree to a loss (7 of the module's docstring); [] without one."""
        hits = [i for i, (_, label, _, module, _) in enumerate(self.tree)
                if module == "pipelines.losses" or "loss" in label.rpartition(".")[2].lower()]
        path, below = [], MAX_DEPTH + 2
        for depth, label, *_ in reversed(self.tree[: hits[0] + 1] if hits else []):
            if depth < below:
                path, below = [label, *path], depth
        return path

    def report(self, trace: bool) -> str:
        """The numbers, modules, climbs and spine; with ``trace`` the call tree too."""
        lines = [", ".join(f"{k} {v}" for k, v in self.numbers().items())]
        visited = list(dict.fromkeys(m for m, _ in self.trace))
        lines += [f"modules ({len(visited)}, first visit first):", *(f"  {m} ({layer_of(m) or '-'})" for m in visited)]
        lines += [f"climbs ({len(self.climbs)}):", *(f"  {c}" for c in self.climbs)]
        lines += [f"spine ({len(path := self.spine())}):", *([f"  {p}" for p in path] or ["  (no loss reached)"])]
        if trace:
            lines += ["call tree:", *(f"  {'  ' * d}{label}({CLASS_PATH.sub(':', params)}){'  [again]' * again}"
                                      for d, label, params, _, again in self.tree)]
        return "\n".join(lines)


def walk(root: Path, kind: str) -> Walk | None:
    """The last walk from ``run`` of ``pipelines.stages.<kind>`` (None without one)."""
    ix = Index(root)
    if not isinstance(start := ix.symbol(f"pipelines.stages.{kind}", "run"), Fn):
        return None
    walks, stored = [], -1
    while len(walks) < 8 and stored != (stored := sum(len(c.attrs) for c in ix.classes)):  # until none is new
        walks.append(Walk(ix, start))
    return walks[-1]


def main(argv: list[str] | None = None) -> int:
    """The command line; 1 when the tree has no ``run`` for the kind."""
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("root", nargs="?", type=Path, default=Path(__file__).resolve().parents[2])
    parser.add_argument("--kind", default="ppo", help="the stage kind: pipelines.stages.<kind>.run")
    parser.add_argument("--trace", action="store_true", help="print the call tree")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = parser.parse_args(argv)
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 20_000))  # for absurdly long attribute chains
    if (w := walk(args.root.resolve(), args.kind)) is None:
        print(f"no function run in pipelines.stages.{args.kind} under {args.root}", file=sys.stderr)
        return 1
    print(json.dumps({"root": str(args.root), "kind": args.kind, **w.numbers()}, indent=2) if args.json
          else w.report(args.trace))
    return 0


if __name__ == "__main__":
    sys.exit(main())
