"""Dependencies point one way (DESIGN.md): every import statement of pf_jax (module level, inside functions
and under TYPE_CHECKING alike) forms a graph of files and a graph of folders; neither has a circle, and
no file makes a forbidden arrow.

    losses                        import nothing of ours
    models                        only sharding, kernels (the CPU implementation behind models.ops) and
                                  config (the UserError family its weight errors belong to)
    config                        nothing of ours (every other layer reads the recipe schema)
    data, envs, rewards           never the trainer (training), the method layer (methods) or tasks
"""

import ast
from pathlib import Path

import networkx as nx
import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pf_jax"

ALLOWED = {"losses": set(), "config": set(), "models": {"sharding", "kernels", "config"}}
FORBIDDEN = {folder: {"training", "methods", "tasks", "planning"} for folder in ("data", "envs", "rewards")}


def folder_of(path: Path, root: Path) -> str:
    """The first folder under the package root holding the file; a top-level module (pf_jax/train.py) is
    the '<cli>' layer."""
    parts = path.relative_to(root).parts
    return parts[0] if len(parts) > 1 else "<cli>"


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the package `root`."""
    out = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _resolve(name: str, known: dict[str, Path]) -> str:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name


def _imported(node: ast.AST, package: str, known: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        return [_resolve(a.name, known) for a in node.names if a.name.split(".")[0] == package]
    if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == package:
        return [_resolve(f"{node.module}.{a.name}", known) for a in node.names]
    return []


def import_graph(root: Path) -> nx.DiGraph:
    """Files of the package `root` and the imports between them (the package's __init__ excluded: it is
    every module's parent, not a dependency)."""
    known, package = modules(root), root.name
    graph = nx.DiGraph()
    for name, path in known.items():
        graph.add_node(name, folder=folder_of(path, root))
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for target in _imported(node, package, known):
                if target not in (name, package):
                    graph.add_edge(name, target)
    return graph


def folder_graph(graph: nx.DiGraph) -> nx.DiGraph:
    out = nx.DiGraph()
    for a, b in graph.edges:
        fa, fb = graph.nodes[a]["folder"], graph.nodes[b]["folder"]
        if fa != fb:
            out.add_edge(fa, fb)
    return out


def circles(graph: nx.DiGraph) -> list[list[str]]:
    return [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]


def wrong_arrows(graph: nx.DiGraph) -> list[str]:
    bad = []
    for a, b in graph.edges:
        fa, fb = graph.nodes[a]["folder"], graph.nodes[b]["folder"]
        if fa == fb:
            continue
        if fa in ALLOWED and fb not in ALLOWED[fa]:
            bad.append(f"{a} -> {b} ({fa} may import only {sorted(ALLOWED[fa]) or 'nothing of ours'})")
        if fb in FORBIDDEN.get(fa, ()):
            bad.append(f"{a} -> {b} ({fa} must not import {fb})")
    return bad


@pytest.fixture(scope="module")
def graph() -> nx.DiGraph:
    return import_graph(PACKAGE)


def test_no_circle_between_files(graph):
    assert circles(graph) == []


def test_no_circle_between_folders(graph):
    assert circles(folder_graph(graph)) == []


def test_no_forbidden_arrow(graph):
    assert wrong_arrows(graph) == []


def test_the_walk_sees_every_kind_of_import(graph):
    # module level, inside a function, and a `from pkg.folder import module` form
    assert graph.has_edge("pf_jax.train", "pf_jax.methods.compose")
    assert graph.has_edge("pf_jax.training.trainer", "pf_jax.evaluation.report")
    assert graph.has_edge("pf_jax.methods.registry", "pf_jax.methods.agentic")


def test_the_checks_catch_a_circle_and_a_forbidden_arrow(tmp_path):
    pkg = tmp_path / "pf_jax"
    for name, text in {
        "__init__.py": "",
        "losses/__init__.py": "",
        "losses/a.py": "from pf_jax.data import rows\n",  # forbidden: losses import nothing of ours
        "data/__init__.py": "",
        "data/rows.py": "def f():\n    from pf_jax.training import loop\n",  # forbidden, and a folder circle
        "training/__init__.py": "",
        "training/loop.py": "import pf_jax.data.rows\nfrom pf_jax.training import step\n",
        "training/step.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pf_jax.training import loop\n",
    }.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    g = import_graph(pkg)
    assert any({"pf_jax.training.loop", "pf_jax.training.step"} <= set(c) for c in circles(g))
    assert ["data", "training"] in circles(folder_graph(g))
    arrows = wrong_arrows(g)
    assert any("pf_jax.losses.a -> pf_jax.data.rows" in a for a in arrows)
    assert any("pf_jax.data.rows -> pf_jax.training.loop" in a for a in arrows)
