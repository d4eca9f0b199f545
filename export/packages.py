"""The optional packages of exported encoders (requirements-export.txt): imported only where an export is written
or an exported ONNX folder is run, with a one-line error saying how to install them."""
from __future__ import annotations

import importlib
import importlib.metadata
from types import ModuleType

from utils.errors import SettingError

REQUIREMENTS = "pip install -r requirements-export.txt (or: source scripts/setup_env.sh export)"


def import_optional(name: str, purpose: str) -> ModuleType:
    """The module `name`, or a SettingError naming what needs it and how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise SettingError(f"{purpose} needs the `{name}` package: {REQUIREMENTS}") from None


def version_of(name: str) -> str | None:
    """An installed package's version (None where it is not installed)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
