"""Files the scripts write: whole-file replacement (temporary file + rename, never through a link planted at the
destination), clean-up of the temporary files an interrupted write leaves, and output-folder checks."""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

# atomic_write's temporary names: "." + the destination's name + "." + mkstemp's 8 random characters + ".tmp".
_STALE_TEMP = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """Call write(file_object) on a new temporary file beside path, fsync it, then rename it over path.

    The rename replaces whatever is at path, a symbolic link included (the link's target is never written).
    On any failure (out of disk, interrupt) the temporary file is removed and path keeps its old content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; the result should look like any other file
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON atomically (indented, UTF-8)."""
    atomic_write(path, lambda f: f.write((json.dumps(data, indent=2) + "\n").encode("utf-8")))


def is_stale_temp(name: str) -> bool:
    """Whether a file name is one of atomic_write's temporary files (left behind only by a killed process)."""
    return bool(_STALE_TEMP.match(name))


def remove_stale_temp_files(folder: str | os.PathLike) -> list[str]:
    """Delete the temporary files that interrupted atomic writes left in folder; returns their names."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        if is_stale_temp(entry.name) and (entry.is_symlink() or entry.is_file()):
            entry.unlink()
            removed.append(entry.name)
    return sorted(removed)


def folder_contents(folder: str | os.PathLike) -> list[str]:
    """Names in folder, stale temporary files aside; [] when it does not exist."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(entry.name for entry in folder.iterdir() if not is_stale_temp(entry.name))


def check_writable_folder(folder: str | os.PathLike) -> None:
    """Create folder if needed and prove that a file can be created in it; raises OSError otherwise."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-check.", suffix=".tmp")
    os.close(fd)
    os.remove(probe)
