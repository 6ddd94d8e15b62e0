"""The structure of the project's packages: sparse_core's module and function sizes, and the import
graph read from the source (every ``import`` and ``from ... import`` statement, at module level or
inside a function, counts): no module imports itself through others (no cycle), the packages keep
their layering, and the trainer's modules keep their seam."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sparse_core", "runstore", "sweeps", "analysis")


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _targets(node: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The project modules an import statement loads (``from pkg import name`` counts pkg.name where
    that is a module, else pkg)."""
    out = set()
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            anchor = module.split(".") if is_package else module.split(".")[:-1]
            anchor = anchor[:len(anchor) - (node.level - 1)]
            base = ".".join(anchor + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name:
            out.add(name)
    return out


def import_graph() -> dict[str, set[str]]:
    files = {p: _module(p) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    known = set(files.values())
    graph: dict[str, set[str]] = {}
    for path, module in files.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= _targets(node, module, path.name == "__init__.py", known)
        graph[module] = edges - {module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
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


def test_the_checker_finds_a_cycle_through_a_function_level_import(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    source = "def f():\n    from .train import run\n"
    node = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom))
    assert _targets(node, "sparse_core.trainer", False, {"sparse_core", "sparse_core.train"}) == {"sparse_core.train"}


def test_no_module_of_the_project_imports_itself_through_others():
    graph = import_graph()
    assert "sparse_core.trainer" in graph and graph["sparse_core.runner"] >= {"sparse_core.trainer"}
    assert cycles(graph) == []


def test_the_trainer_seam_points_one_way():
    """The run's entry (train, runner) over the loop (trainer) over the hooks and the run state's parts;
    nothing below imports the entry, and the loop does not import the run state (it drives any state)."""
    graph = import_graph()
    entry = {"sparse_core.train", "sparse_core.runner", "sparse_core.cli"}
    for module, edges in graph.items():
        if module.startswith("sparse_core.") and module not in entry | {"sparse_core.__main__"}:
            assert not edges & {"sparse_core.train", "sparse_core.runner"}, module
    assert "sparse_core.run_state" not in graph["sparse_core.trainer"]
    assert not graph["sparse_core.hooks"] & {"sparse_core.trainer", "sparse_core.run_state"}
    for pkg in ("sparse_core", "runstore"):
        for module, edges in graph.items():
            if module.split(".")[0] == pkg:
                assert not {e for e in edges if e.split(".")[0] in ("sweeps", "analysis")}, module


def test_no_module_of_the_packages_over_400_lines_nor_function_over_60():
    paths = sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))
    assert {p.parent.name for p in paths} >= set(PACKAGES)
    for path in paths:
        source = path.read_text()
        assert source.count("\n") <= 400, path
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno + 1 <= 60, f"{path}:{node.name}"
