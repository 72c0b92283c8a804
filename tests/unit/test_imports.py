"""The layout's import rules, read from the sources: no import circle (module-level or in a function; type-only
imports aside), bench imports nothing of ours, the harness never reaches into Locust's private modules, and only
the entry points import upward."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("bench", "harness", "locustfiles", "mmlu", "reports")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(path: Path, modules: set[str]) -> set[str]:
    """Our modules `path` imports when it runs: every import statement, at module level or in a function, but those
    under `if TYPE_CHECKING` (type annotations only). `from pkg import sub` imports the submodule `pkg.sub`."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {name for name in found if name in modules}


@pytest.fixture(scope="module")
def graph() -> nx.DiGraph:
    modules = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    g = nx.DiGraph()
    g.add_nodes_from(modules)
    for name, path in modules.items():
        for target in runtime_imports(path, set(modules)):
            if target != name:
                g.add_edge(name, target)
    return g


def test_no_import_circle(graph: nx.DiGraph):
    # The CLI and the pipeline import the stages from inside functions (they are the top): not circles.
    top = {"harness.cli", "harness.pipeline"}
    assert [c for c in nx.simple_cycles(graph) if not top & set(c)] == []


def test_bench_imports_nothing_of_ours_but_itself(graph: nx.DiGraph):
    outside = {(a, b) for a, b in graph.edges if a.startswith("bench") and not b.startswith("bench")}
    assert outside == set()


def test_the_harness_and_reports_never_import_locusts_private_modules(graph: nx.DiGraph):
    private = {(a, b) for a, b in graph.edges if b.startswith("locustfiles._") and not a.startswith("locustfiles")}
    assert private == set()
    assert {b for a, b in graph.edges if a.startswith("locustfiles") and b.startswith(("harness", "mmlu"))} == set()


def test_only_the_entry_points_import_the_pipeline_and_the_cli(graph: nx.DiGraph):
    upward = {a for a, b in graph.edges if b in ("harness.pipeline", "harness.cli")}
    assert upward <= {"harness.cli", "harness.pipeline"}
