"""The layers of the package and the one direction of imports between them (README "Layout").

Read from the source files, not by importing them, so a new cycle or a layer skipped fails here
before anything runs:

    models  <-  pipeline  <-  trainers  <-  sampling  <-  eval  <-  cli

A layer imports only itself and the layers to its left; models import nothing of the project. No
project module is imported inside a function body outside cli/ (heavy third-party packages may
be, e.g. ray or matplotlib), so the import graph is what the top of each file says.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["models", "pipeline", "trainers", "sampling", "eval", "cli"]  # low -> high


def project_imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported layer, line, inside a function) for every import of a flatdino module."""
    layer = path.parent.name
    tree = ast.parse(path.read_text(), filename=str(path))
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            in_function.update(id(n) for n in ast.walk(node) if n is not node)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
            if node.level == 1:  # `from .x import y` stays in this layer
                names = [f"flatdino.{layer}.{node.module or ''}"]
            elif node.level == 2:  # `from ..pipeline.x import y`: another layer
                names = [f"flatdino.{node.module or ''}"]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "flatdino" and len(parts) > 1:
                found.append((parts[1], node.lineno, id(node) in in_function))
    return found


def violations(root: Path) -> list[str]:
    """Every import that breaks the layer rule, as 'file:line: message'."""
    problems = []
    for layer in LAYERS:
        allowed = set(LAYERS[: LAYERS.index(layer) + 1])
        for path in sorted((root / layer).glob("*.py")):
            for target, line, lazy in project_imports(path):
                where = f"{path.relative_to(root)}:{line}"
                if target not in allowed:
                    problems.append(f"{where}: {layer} imports {target} (a layer above it)")
                elif lazy and layer != "cli":
                    problems.append(f"{where}: a project import inside a function")
    return problems


def test_imports_run_one_way():
    assert violations(ROOT) == []


def test_library_imports_are_relative():
    """Layers import each other relatively (`from ..pipeline.store import x`), so a static tool
    resolves them from the source tree; `flatdino.*` exists only once installed (`make lint` runs
    basedpyright's import resolution over the layers)."""
    absolute = []
    for layer in LAYERS:
        for path in sorted((ROOT / layer).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if isinstance(node, ast.ImportFrom) and node.level == 0:
                    names = [node.module or ""]
                absolute += [
                    f"{path.relative_to(ROOT)}:{node.lineno}"
                    for n in names
                    if n.split(".")[0] == "flatdino"
                ]
    assert absolute == []


def test_every_layer_is_a_package_folder_and_installed():
    pyproject = (ROOT / "pyproject.toml").read_text()
    for layer in LAYERS:
        assert (ROOT / layer / "__init__.py").exists(), layer
        assert f'"flatdino.{layer}" = "{layer}"' in pyproject, layer


def test_models_import_nothing_of_the_project():
    for path in (ROOT / "models").glob("*.py"):
        outside = [t for t, _, _ in project_imports(path) if t != "models"]
        assert outside == [], path.name


@pytest.mark.parametrize(
    "layer, source, message",
    [
        (
            "pipeline",
            "from flatdino.trainers.loop import train_loop\n",
            "pipeline imports trainers",
        ),
        (
            "models",
            "from flatdino.pipeline.errors import FlatDinoError\n",
            "models imports pipeline",
        ),
        ("eval", "def f():\n    from flatdino.models import vae\n", "inside a function"),
        ("pipeline", "from ..trainers.loop import train_loop\n", "pipeline imports trainers"),
        ("trainers", "def f():\n    from .loop import train_loop\n", "inside a function"),
    ],
)
def test_the_check_catches_a_backward_or_hidden_import(tmp_path, layer, source, message):
    """The rule would fail on the old tree: pipeline/latents.py imported the VAE from trainers
    inside a function, trainers/eval_fid.py imported the pipeline inside functions."""
    (tmp_path / layer).mkdir()
    (tmp_path / layer / "bad.py").write_text(source)
    found = violations(tmp_path)
    assert len(found) == 1 and message in found[0]
