"""Whole folders written atomically: filled as a fresh temporary sibling, then swapped in by rename.

A fresh folder cannot hold a link planted by someone else, so nothing is ever written through one; a
failed or killed run leaves the previous folder as it was, plus at most a `.<name>.tmp-*` or
`.<name>.old-*` sibling, which the next run removes (`remove_stale_folders`).
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def fresh_folder_beside(out_dir: Path) -> Path:
    """A new, empty `.<name>.tmp-XXXXXXXX` folder next to out_dir (permissions as the umask says)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result should look like any other folder
    return tmp


def swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the filled folder tmp to out_dir; an existing out_dir is moved aside first and deleted last."""
    if not out_dir.exists():
        os.rename(tmp, out_dir)
        return
    backup = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.rename(out_dir, backup / "previous")  # a rename: the old folder survives any failure below
    try:
        os.rename(tmp, out_dir)
    except OSError:
        os.rename(backup / "previous", out_dir)
        backup.rmdir()  # only once the old folder is back in place
        raise
    shutil.rmtree(backup, ignore_errors=True)


@contextlib.contextmanager
def replacing_folder(out_dir: Path) -> Iterator[Path]:
    """Yield a fresh sibling folder to fill; when the block succeeds it replaces out_dir in one rename, when it
    fails it is deleted and out_dir is untouched."""
    tmp = fresh_folder_beside(out_dir)
    try:
        yield tmp
        swap_into_place(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_atomically(out_dir: Path, files: dict[str, bytes]) -> None:
    """Write `files` (relative name -> bytes) into a fresh sibling folder, then swap it in; on failure
    `out_dir` is untouched."""
    with replacing_folder(out_dir) as tmp:
        for name, content in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            with open(tmp / name, "wb") as f:
                f.write(content)
                f.flush()
                os.fsync(f.fileno())


def remove_stale_folders(out_dir: Path) -> list[str]:
    """Delete the `.<name>.tmp-*` / `.<name>.old-*` siblings that killed runs left next to out_dir."""
    pattern = re.compile(rf"^\.{re.escape(out_dir.name)}\.(tmp|old)-[a-z0-9_]{{8}}$")
    if not out_dir.parent.is_dir():
        return []
    stale = [p for p in out_dir.parent.iterdir() if pattern.match(p.name) and p.is_dir() and not p.is_symlink()]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return sorted(p.name for p in stale)
