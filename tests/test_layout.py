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


STORE_MODULES = {"pipeline/store.py", "pipeline/feature_store.py", "pipeline/latent_store.py"}
STORE_MODULES |= {"pipeline/storage.py"}  # where a Zarr group is opened at all
STORE_MODULES |= {"pipeline/local_shards.py"}  # a feature store's shard files, read directly
STORE_ARRAYS = {"features", "labels", "valid", "done", "mu", "logvar", "mu_mean", "mu_std", "cls"}


def store_reads(path: Path, rel: str) -> list[str]:
    """Every read of a store's arrays that bypasses the store classes: zarr imported, `open_group`
    named, a store's `.group` touched (not a regex match's `.group(1)`), or an array name looked
    up in something called a group."""
    tree = ast.parse(path.read_text(), filename=str(path))
    called = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    found = []
    for node in ast.walk(tree):
        what = None
        if (
            isinstance(node, ast.Import)
            and any(a.name.split(".")[0] == "zarr" for a in node.names)
            or isinstance(node, ast.ImportFrom)
            and (node.module or "").split(".")[0] == "zarr"
        ):
            what = "imports zarr"
        elif isinstance(node, ast.ImportFrom) and any(a.name == "open_group" for a in node.names):
            what = "imports open_group"
        elif isinstance(node, ast.Name | ast.Attribute) and "open_group" in (
            getattr(node, "id", None),
            getattr(node, "attr", None),
        ):
            what = "opens a group"
        elif isinstance(node, ast.Attribute) and node.attr == "group" and id(node) not in called:
            what = "reads a store's .group"
        elif (
            isinstance(node, ast.Subscript)
            and isinstance(node.slice, ast.Constant)
            and node.slice.value in STORE_ARRAYS
            and isinstance(node.value, ast.Name)
            and node.value.id.endswith("group")
        ):
            what = f"reads the store array {node.slice.value!r}"
        if what:
            found.append(f"{rel}:{node.lineno}: {what}")
    return found


def store_violations(root: Path) -> list[str]:
    """Store arrays read outside the store modules (a store's data goes through its class)."""
    problems = []
    for layer in LAYERS:
        for path in sorted((root / layer).glob("*.py")):
            rel = str(path.relative_to(root))
            if rel not in STORE_MODULES:
                problems += store_reads(path, rel)
    return problems


def test_store_arrays_are_read_only_through_the_store_classes():
    assert store_violations(ROOT) == []


@pytest.mark.parametrize(
    "source, message",
    [
        ("from ..pipeline.storage import open_group\n", "imports open_group"),
        ("import zarr\n", "imports zarr"),
        ("def f(s):\n    return s.group['valid'][:]\n", "reads a store's .group"),
        ("def f(p):\n    return storage.open_group(p)\n", "opens a group"),
        ("def f(group):\n    return group['mu'][:]\n", "reads the store array 'mu'"),
    ],
)
def test_the_check_catches_a_store_read_outside_the_stores(tmp_path, source, message):
    """Today's tree would fail it: the loaders, encode-latents and `eval knn` opened the groups
    themselves and FD, `eval fid` and k-NN each read pooled view-0 features their own way."""
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "bad.py").write_text(source)
    found = store_violations(tmp_path)
    assert len(found) == 1 and message in found[0], found


def test_the_store_check_leaves_other_groups_alone(tmp_path):
    """A regex match's `.group(1)` and a dict of sample arrays are not store reads."""
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "ok.py").write_text(
        "import re\ndef f(s, arrays):\n    return re.match('a', s).group(0), arrays['labels']\n"
    )
    assert store_violations(tmp_path) == []


def test_library_files_stay_short():
    """A file does one job: ~400 lines, 450 at most (docs/development.md)."""
    long = {
        str(path.relative_to(ROOT)): n
        for layer in LAYERS
        for path in (ROOT / layer).glob("*.py")
        if (n := len(path.read_text().splitlines())) > 450
    }
    assert long == {}
