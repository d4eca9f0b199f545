"""The package graph points one way: utils/ <- clip/ <- models/ <- datasets/ <- export/, evaluation/ <- engine/,
retrieval/ <- the scripts (train.py, test.py, search.py, scripts/); the training run and the search feature do not import
each other, and exported encoders (export/) need neither: the search feature may run them."""
import ast
import subprocess
import sys

import pytest

from tests.conftest import REPO

# Project packages each package may import (lazy imports inside functions count too).
ALLOWED = {
    "utils": set(),
    "clip": {"utils"},
    "models": {"clip", "utils"},
    "datasets": {"clip", "models", "utils"},
    "export": {"clip", "models", "datasets", "utils"},
    "evaluation": {"clip", "models", "datasets", "utils"},
    "engine": {"clip", "models", "datasets", "evaluation", "utils"},
    "retrieval": {"clip", "models", "datasets", "evaluation", "export", "utils"},
}
PROJECT = set(ALLOWED) | {"train", "test", "search", "benchmarks", "scripts", "tests"}


def imported_names(path):
    """Top-level names of every absolute import anywhere in a file's body (lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def imported_packages(path):
    """Top-level project packages that a file imports anywhere in its body."""
    return imported_names(path) & PROJECT


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_only_the_layers_below_them(package):
    wrong = {}
    for path in sorted((REPO / package).rglob("*.py")):
        extra = imported_packages(path) - ALLOWED[package] - {package}
        if extra:
            wrong[str(path.relative_to(REPO))] = sorted(extra)
    assert not wrong, f"{package}/ imports a layer above it: {wrong}"


EXPORT_PACKAGES = {"onnx", "onnxruntime", "onnxscript"}  # requirements-export.txt: optional


def test_the_export_packages_are_imported_by_export_alone():
    # In the source: no import of them outside export/ (which reaches them lazily, through export/packages.py).
    offenders = []
    for path in sorted(REPO.rglob("*.py")):
        parts = path.relative_to(REPO).parts
        if parts[0] in ("export", "tests") or any(part.startswith(".") for part in parts):
            continue
        if imported_names(path) & EXPORT_PACKAGES:
            offenders.append(str(path.relative_to(REPO)))
    assert not offenders, offenders
    # At run time: the entry points and the search feature load without them (they run where they are not installed).
    probe = ("import sys, search, train, retrieval.build_index, retrieval.text_search, retrieval.search_model; "
             f"print(sorted(m for m in {sorted(EXPORT_PACKAGES)} if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0 and loaded.stdout.strip() == "[]", loaded.stderr[-2000:]
