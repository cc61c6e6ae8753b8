"""No import cycles between gloronet's modules, function-level (lazy) imports included.

A cycle makes import order matter and hides which idea builds on which (the brief: "no import
cycles"); a lazy import inside a function is still an edge. Edges go from a module to each
gloronet module it names in an ``import`` / ``from … import`` (a name that is itself a submodule
counts as that submodule); the implicit import of a package's ``__init__`` by its submodules does
not (a package that re-exports its submodules would otherwise be a cycle by construction)."""
from __future__ import annotations

import ast
from pathlib import Path

import gloronet

ROOT = Path(gloronet.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _edges(name: str, source: str, is_package: bool, modules) -> set[str]:
    """The gloronet modules that module ``name`` (its ``source``) imports, anywhere in its body."""
    package = name if is_package else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in modules and t != name}
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _edges(name, path.read_text(), path.name == "__init__.py", modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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


def test_no_import_cycles():
    graph = _graph()
    assert len(graph) > 40 and sum(map(len, graph.values())) > 100  # the walk saw the package
    assert _cycles(graph) == []


def test_the_finder_sees_lazy_relative_and_submodule_imports():
    modules = {"p", "p.a", "p.b", "p.sub", "p.sub.c"}
    lazy = "def f():\n    from .b import thing\n"
    assert _edges("p.a", lazy, False, modules) == {"p.b"}
    assert _edges("p.sub.c", "from .. import a\nfrom ..sub import c\nimport p.b\n", False, modules) == {"p.a", "p.b"}
    assert _edges("p", "from . import a\nfrom .sub import c\n", True, modules) == {"p.a", "p.sub.c"}
    graph = {"p.a": {"p.b"}, "p.b": {"p.sub.c"}, "p.sub.c": {"p.a"}, "p": {"p.a"}}
    assert _cycles(graph) == [["p.a", "p.b", "p.sub.c"]]
    assert _cycles({"p.a": {"p.b"}, "p.b": set()}) == []
