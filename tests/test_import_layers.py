"""The package's layers, read from its source (nothing imported): no import cycle between files or
between packages, analyses/ and pruning/ never import each other, every package's settings.py
imports nothing of its own package, and an import inside a function only defers a heavy one (with
its reason beside it). Issue 21: the loops were once hidden by imports made inside functions."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "axes_pipeline"
PKG = "axes_pipeline"


def _module(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join([PKG, *(parts[:-1] if parts[-1] == "__init__" else parts)])


def _imports(root: Path = SRC, pkg: str = PKG) -> tuple[dict[str, set[str]], list[tuple[str, str, int, str]]]:
    """``(edges, local)``: module -> the package modules it imports, and each import made inside a
    function as (module, target, line, its source line and the three above it)."""
    files = {}
    for p in root.rglob("*.py"):
        parts = list(p.relative_to(root).with_suffix("").parts)
        files[".".join([pkg, *(parts[:-1] if parts[-1] == "__init__" else parts)])] = p
    edges, local = defaultdict(set), []
    for mod, path in files.items():
        text = path.read_text()
        tree = ast.parse(text)
        inside = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for n in ast.walk(f) if n is not f}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
                    base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            for name in names:
                while name and name not in files:
                    name = name.rpartition(".")[0]
                if name and name != mod:
                    edges[mod].add(name)
                    if id(node) in inside:
                        local.append((mod, name, node.lineno, text.splitlines()[max(0, node.lineno - 4):node.lineno]))
    return edges, local


def _package(mod: str) -> str:
    rest = mod[len(PKG) + 1:]
    return rest.split(".")[0] if rest else "__init__"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan, iterative enough for a package)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def _package_graph(edges) -> dict[str, set[str]]:
    graph = defaultdict(set)
    for a, bs in edges.items():
        for b in bs:
            if _package(a) != _package(b) and _package(b) != "__init__":
                graph[_package(a)].add(_package(b))
    return graph


@pytest.fixture(scope="module")
def imports():
    return _imports()


def test_no_cycle_between_files_or_packages(imports):
    edges, _ = imports
    assert _cycles(edges) == []
    assert _cycles(_package_graph(edges)) == []


def test_analyses_and_pruning_never_import_each_other(imports):
    graph = _package_graph(imports[0])
    assert "pruning" not in graph["analyses"] and "analyses" not in graph["pruning"]
    # both read the axes table from below
    assert "axes" in graph["analyses"] and "axes" in graph["pruning"]
    assert not graph["axes"] & {"analyses", "pruning", "report", "schema", "tasks"}


def test_settings_import_nothing_of_their_package(imports):
    edges, _ = imports
    for mod, targets in edges.items():
        if mod.endswith(".settings"):
            own = mod.rsplit(".", 1)[0]
            assert not [t for t in targets if t.startswith(own + ".")], mod


def test_an_import_inside_a_function_says_what_it_defers(imports):
    _, local = imports
    undocumented = [f"{mod}:{line} -> {target}" for mod, target, line, before in local
                    if not any("deferred:" in text for text in before)]
    assert undocumented == []


def test_the_checker_sees_a_cycle_and_an_undocumented_local_import(tmp_path):
    # the check itself: a two-file loop, one side hidden in a function, must be found
    pkg = tmp_path / "toy"
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("")
    (pkg / "a" / "x.py").write_text("from toy.b import y\n")
    (pkg / "b.py").write_text("def f():\n    from toy.a import x\n    return x\n")
    edges, local = _imports(pkg, "toy")
    assert _cycles(edges) == [["toy.a.x", "toy.b"]]
    assert [(m, t) for m, t, _, _ in local] == [("toy.b", "toy.a.x")]


# ------------------------------------------------------------------------------ the axes layer
