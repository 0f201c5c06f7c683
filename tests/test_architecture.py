"""The package graph points down: ``sae`` (plain torch) ← ``common`` (what both Ray layers share) ←
``pipelines`` and ``serve`` ← ``pluristeer`` (the CLI). Imports sit at module top, except the CLI's."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PRODUCT = ("sae", "common", "pipelines", "serve", "pluristeer")
ALLOWED = {
    "sae": {"sae"},
    "common": {"sae", "common"},
    "pipelines": {"sae", "common", "pipelines"},
    "serve": {"sae", "common", "serve"},
    "pluristeer": set(PRODUCT),
}
LAZY_OK = {"pluristeer/cli.py"}  # the CLI imports its stages when a command runs, so --help stays fast


def _modules(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def _imports(tree: ast.Module) -> list[tuple[ast.stmt, str]]:
    """Every import in the module (at any depth) with the absolute module name it reads."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            out.append((node, node.module or ""))
    return out


@pytest.mark.parametrize("package", PRODUCT)
def test_package_imports_point_down(package: str) -> None:
    wrong = []
    for path in _modules(package):
        for node, name in _imports(ast.parse(path.read_text())):
            root = name.split(".")[0]
            if root in (*PRODUCT, "cluster", "benchmarks", "tests") and root not in ALLOWED[package]:
                wrong.append(f"{path.relative_to(REPO)}:{node.lineno} imports {name}")
    assert not wrong, f"{package} may import only {sorted(ALLOWED[package])}:\n" + "\n".join(wrong)


def test_sae_never_imports_ray() -> None:
    wrong = [
        f"{path.relative_to(REPO)}:{node.lineno}"
        for path in _modules("sae")
        for node, name in _imports(ast.parse(path.read_text()))
        if name.split(".")[0] == "ray"
    ]
    assert not wrong, "sae/ is plain PyTorch (usable in a notebook, no Ray):\n" + "\n".join(wrong)


def test_project_imports_are_at_module_top() -> None:
    inner = []
    for package in PRODUCT:
        for path in _modules(package):
            rel = path.relative_to(REPO).as_posix()
            tree = ast.parse(path.read_text())
            top = {id(node) for node in tree.body}
            for node, name in _imports(tree):
                if id(node) not in top and name.split(".")[0] in PRODUCT and rel not in LAZY_OK:
                    inner.append(f"{rel}:{node.lineno} imports {name} inside a function")
    assert not inner, "a module's header should say what it depends on:\n" + "\n".join(inner)


def test_the_graph_test_sees_a_wrong_edge(tmp_path: Path) -> None:
    """The checks above read real import statements: an upward import in a snippet is found."""
    snippet = "def f():\n    from serve.app import build\n"
    found = [name for _, name in _imports(ast.parse(snippet))]
    assert found == ["serve.app"]
