"""The package's layout as docs/design.md draws it: no import circle between sweeper's modules (counting imports
inside functions, which run too), and Ray imported only by the modules that schedule trials on it."""
from __future__ import annotations

import ast
from pathlib import Path

import sweeper

PACKAGE = Path(sweeper.__file__).resolve().parent
# node_preload runs only inside Ray's own worker processes (a node's preload), where it imports Ray Tune ahead;
# node_refill calls the nodes' raylets through Ray's gRPC helpers as a launch leaves the cluster
RAY_IMPORTERS = {"sweeper.scheduler", "sweeper.local_ray", "sweeper.remote_store", "sweeper.cluster_inputs",
                 "sweeper.node_preload", "sweeper.node_refill"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The sweeper modules ``path`` imports, anywhere in it (``from . import x`` counts as importing ``x``)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import name`: the submodule pkg.name where there is one, else pkg itself
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in modules and t != name}
    return out


def _graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths)
    return {m: _imports(p, modules) for m, p in paths.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                return path[path.index(t):] + [t]
            if t not in state and (found := visit(t)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_graph_sees_imports_inside_functions_and_packages_with_code():
    graph = _graph()
    # warm_worker imports runner inside a function only: the graph must see it, or a circle through it would pass
    assert "sweeper.runner" in graph["sweeper.warm_worker"]
    # taskdata's code is its __init__.py; `from . import precisions` is the submodule, not the package
    assert "sweeper.taskdata" in graph["sweeper.trials"]
    assert "sweeper" not in graph["sweeper.trials"]


def test_no_import_circle_between_sweepers_modules():
    cycle = _cycle(_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_only_the_scheduling_modules_import_ray():
    importers = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            if any(n == "ray" or n.startswith("ray.") for n in names):
                importers.add(_module_name(path))
    assert importers == RAY_IMPORTERS, importers ^ RAY_IMPORTERS
