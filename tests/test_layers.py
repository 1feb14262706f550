"""The packages' layering, read from every import statement (lazy ones inside functions too):
shardkit at the bottom, the synthetic world above it, the four stage packages on top. A module
never imports from a higher layer, and never a private name (`_x`) of another package."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = {"shardkit": 0, "synthetic": 1, "curation": 2, "captioning": 2, "training": 2, "analysis": 2}


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names imported from it) of every import in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
    return found


def _project_files() -> list[tuple[str, Path]]:
    return [(package, path) for package in LAYERS for path in sorted((REPO / package).rglob("*.py"))]


def test_every_package_is_in_a_layer():
    packages = {p.parent.name for p in REPO.glob("*/__init__.py")}
    assert packages - {"tests"} == set(LAYERS), "a new top-level package needs a layer here and in README's layout"


def test_no_module_imports_from_a_higher_layer():
    upward = []
    for package, path in _project_files():
        for line, module, _ in _imports(path):
            target = module.split(".")[0]
            if target in LAYERS and LAYERS[target] > LAYERS[package]:
                upward.append(f"{path.relative_to(REPO)}:{line} imports {module}")
    assert not upward, "\n".join(upward)


def test_no_module_imports_another_packages_private_names():
    private = []
    for package, path in _project_files():
        for line, module, names in _imports(path):
            target = module.split(".")[0]
            if target in LAYERS and target != package:
                hidden = [n for n in names if n.startswith("_")] + \
                         [part for part in module.split(".")[1:] if part.startswith("_")]
                if hidden:
                    private.append(f"{path.relative_to(REPO)}:{line} imports {', '.join(hidden)} from {module}")
    assert not private, "\n".join(private)


def test_the_readme_layout_table_names_every_package():
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("## Layout of the code"):]
    for package in LAYERS:
        assert f"| `{package}/` |" in table, package
