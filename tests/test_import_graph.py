"""The package's import graph, read from the source with ``ast``: no cycles, nothing from experiments/.

Every import counts, function-local ones included: a cycle hidden inside a function is
still a cycle (it only moves the failure from import time to call time). Importing
``a.b.c`` also runs the ``__init__`` of ``a.b`` (unless the importer already lives in
it), so those edges are in the graph too.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "bebop_jax"
ROOT = Path(__file__).resolve().parents[1]


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules(root: Path = ROOT) -> dict[str, Path]:
    return {_module_name(p, root): p for p in sorted((root / PACKAGE).rglob("*.py"))}


def _imported(node: ast.AST, module: str, is_package: bool, known: set[str]) -> list[str]:
    """The modules an import statement names: ``from x import y`` names x.y when y is a module, else x."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative: resolve against this module's package
        pkg = module.split(".") if is_package else module.split(".")[:-1]
        pkg = pkg[: len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([base] if base else []))
    submodules = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
    # names that are not modules are read from ``base`` itself (its __init__ must have run)
    return submodules + ([base] if len(submodules) < len(node.names) else [])


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the package modules its execution imports (explicit names plus the packages they run)."""
    modules = _modules(root)
    known = set(modules)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}  # itself and its packages
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            for target in _imported(node, name, is_package, known):
                parts = target.split(".")
                for i in range(1, len(parts) + 1):  # a.b.c runs a, a.b, a.b.c
                    step = ".".join(parts[:i])
                    if (step in known or step.split(".")[0] == "experiments") and (step not in own or i == len(parts)):
                        edges.add(step)
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in graph:
                continue
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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_graph_sees_every_kind_of_import(tmp_path):
    """The reader itself: function-local, relative and from-imports of modules all make edges."""
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .leaf import f\n")
    (pkg / "sub" / "leaf.py").write_text("def f():\n    from bebop_jax import top\n    return top\n")
    (pkg / "top.py").write_text("from bebop_jax.sub import leaf\nimport experiments.x\n")
    graph = import_graph(tmp_path)
    assert graph["bebop_jax.sub"] == {"bebop_jax.sub.leaf"}
    assert graph["bebop_jax.sub.leaf"] == {"bebop_jax.top"}
    assert graph["bebop_jax.top"] == {"bebop_jax.sub", "bebop_jax.sub.leaf", "experiments", "experiments.x"}
    assert find_cycles(graph) == [["bebop_jax.sub", "bebop_jax.sub.leaf", "bebop_jax.top"]]


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles in bebop_jax/:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_library_never_imports_experiments():
    bad = {m: sorted(t for t in targets if t.split(".")[0] == "experiments")
           for m, targets in import_graph().items()}
    bad = {m: t for m, t in bad.items() if t}
    assert not bad, f"bebop_jax imports experiments/: {bad}"
