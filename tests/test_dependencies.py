"""The package graph points one way: utils/ <- clip/ <- models/ <- datasets/ <- evaluation/ <- engine/, retrieval/
<- the scripts (train.py, test.py, search.py); the training run and the search feature do not import each other."""
import ast

import pytest

from tests.conftest import REPO

# Project packages each package may import (lazy imports inside functions count too).
ALLOWED = {
    "utils": set(),
    "clip": {"utils"},
    "models": {"clip", "utils"},
    "datasets": {"clip", "models", "utils"},
    "evaluation": {"clip", "models", "datasets", "utils"},
    "engine": {"clip", "models", "datasets", "evaluation", "utils"},
    "retrieval": {"clip", "models", "datasets", "evaluation", "utils"},
}
PROJECT = set(ALLOWED) | {"train", "test", "search", "benchmarks", "scripts", "tests"}


def imported_packages(path):
    """Top-level project packages that a file imports anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & PROJECT


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_only_the_layers_below_them(package):
    wrong = {}
    for path in sorted((REPO / package).rglob("*.py")):
        extra = imported_packages(path) - ALLOWED[package] - {package}
        if extra:
            wrong[str(path.relative_to(REPO))] = sorted(extra)
    assert not wrong, f"{package}/ imports a layer above it: {wrong}"
