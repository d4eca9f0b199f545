"""The package graph points one way: clip/ <- models/ <- utils/ <- scripts, with datasets/ beside models/."""
import ast

import pytest

from tests.conftest import REPO

# Project packages each package may import (lazy imports inside functions count too).
ALLOWED = {
    "clip": set(),
    "models": {"clip"},
    "datasets": {"clip", "models"},
    "utils": {"clip", "models", "datasets"},
}
PROJECT = {"clip", "models", "datasets", "utils", "train", "test", "search"}


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
    for path in sorted((REPO / package).glob("*.py")):
        extra = imported_packages(path) - ALLOWED[package] - {package}
        if extra:
            wrong[path.name] = sorted(extra)
    assert not wrong, f"{package}/ imports a layer above it: {wrong}"
