"""The house rules of the package layout (README, "Layout"), checked on the import graph.

Data flows one way: ``shards.core`` <- ``shards`` <- ``units`` <- ``pipelines``; no module
imports itself back through others; the k-means estimator leaves distribution to its caller.
Imports inside functions count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("shards", "units", "pipelines")


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            if parts[-1] == "__main__":
                continue
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


MODULES = _modules()


def _imports(name: str, path: pathlib.Path, *, top_level_only: bool) -> set[str]:
    """The project modules ``name`` imports (``from x import y`` counts ``x.y`` when that is
    a module, else ``x``)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                       for a in node.names]  # fmt: skip
        else:
            continue
        out |= {t for t in targets if t in MODULES and t != name}
    return out


def _layer(name: str) -> int:
    if name.startswith("shards.core"):
        return 0
    return {"shards": 1, "units": 2, "pipelines": 3}[name.split(".")[0]]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_flow_one_way(name):
    wrong = {
        target
        for target in _imports(name, MODULES[name], top_level_only=False)
        if _layer(target) > _layer(name)
    }
    assert not wrong, f"{name} imports a later layer: {sorted(wrong)}"


def test_no_module_imports_itself_back():
    graph = {n: _imports(n, p, top_level_only=True) for n, p in MODULES.items()}
    cycles, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_estimator_leaves_distribution_to_its_caller():
    for module in ("units.kmeans.estimator", "units.kmeans.parts", "units.kmeans.pca"):
        imported = _imports(module, MODULES[module], top_level_only=False)
        source = MODULES[module].read_text()
        assert "units.kmeans.stage" not in imported and "import ray" not in source, module
        assert "units.kmeans.transport" not in imported, module


def test_the_demo_synthesiser_stays_out_of_the_runtime():
    users = {
        n
        for n, p in MODULES.items()
        if "pipelines.demo.corpus" in _imports(n, p, top_level_only=False)
    }
    assert users <= {"pipelines.demo"}, sorted(users)
