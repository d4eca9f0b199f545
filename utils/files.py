"""Every file and folder the project writes goes through here: whole-file replacement (temporary file + rename,
never through a link planted at the destination), whole-folder replacement (a fresh sibling folder swapped in by
one atomic rename-exchange), clean-up of what an interrupted write leaves, output-folder checks, and file digests.

A fresh folder cannot hold a link planted by someone else, so nothing is ever written through one; a failed or
killed run leaves the previous folder as it was, plus at most a `.<name>.tmp-*` or `.<name>.old-*` sibling, which
the next run removes (`remove_stale`, which first puts back a folder that a killed fallback swap moved aside)."""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

# What interrupted writes leave beside their destination <name>: atomic_write's files ".<name>.<mkstemp's 8 random
# characters>.tmp" (atomic_link's ".<name>.hardlink.tmp"), and replacing_folder's folders ".<name>.tmp-<8>" (being
# filled) and ".<name>.old-<8>" (the previous folder, moved aside).
_STALE_FILE = re.compile(r"^\.(?P<name>.+)\.([a-z0-9_]{8}|hardlink)\.tmp$")
_STALE_FOLDER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-[a-z0-9_]{8}$")
_UMASK = os.umask(0)
os.umask(_UMASK)


def _written_temporary(path: Path, write: Callable[[BinaryIO], Any]) -> str:
    """A new temporary file beside path holding what write(file_object) wrote, fsynced; removed again on failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; the result should look like any other file
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise
    return tmp


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """Call write(file_object) on a new temporary file beside path, fsync it, then rename it over path.

    The rename replaces whatever is at path, a symbolic link included (the link's target is never written).
    On any failure (out of disk, interrupt) the temporary file is removed and path keeps its old content.
    """
    write_together({path: write})


def write_together(files: dict[str | os.PathLike, Callable[[BinaryIO], Any]],
                   before_replacing: Callable[[], Any] | None = None) -> None:
    """Write several files as one step: each path's writer fills a temporary file beside it (fsynced); only once
    every one is written, before_replacing() runs (for example: delete the files they supersede) and each is renamed
    over its path, replacing a planted link rather than writing through it.

    A failure while writing (a full disk, an interrupt) removes the temporary files and changes nothing else: no
    path is replaced and before_replacing never runs. Its OSError names the path whose file failed.
    """
    written: list[tuple[str, Path]] = []
    try:
        for path, write in files.items():
            try:
                written.append((_written_temporary(Path(path), write), Path(path)))
            except OSError as error:
                if not error.filename:
                    error.filename = str(path)
                raise
        if before_replacing is not None:
            before_replacing()
        for tmp, path in written:
            os.replace(tmp, path)
    finally:
        for tmp, _ in written:
            if os.path.lexists(tmp):
                os.remove(tmp)


def atomic_link(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """target becomes another name of source's file (a copy where the file system has no hard links), atomically."""
    target = Path(target)
    temporary = target.with_name(f".{target.name}.hardlink.tmp")  # a stale-file name: see _STALE_FILE
    temporary.unlink(missing_ok=True)
    try:
        os.link(source, temporary)
    except OSError:
        shutil.copyfile(source, temporary)
    os.replace(temporary, target)


def json_writer(data: Any) -> Callable[[BinaryIO], Any]:
    """A writer for atomic_write or write_together: data as indented UTF-8 JSON."""
    return lambda f: f.write((json.dumps(data, indent=2) + "\n").encode("utf-8"))


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON atomically (indented, UTF-8)."""
    atomic_write(path, json_writer(data))


def is_stale_temp(name: str) -> bool:
    """Whether a file name is one of atomic_write's temporary files (left behind only by a killed process)."""
    return bool(_STALE_FILE.match(name))


def restore_moved_aside(folder: str | os.PathLike, of: str | None = None) -> list[str]:
    """Put back every destination that a killed two-rename swap (swap_into_place's fallback) left moved aside: when
    <name> is absent and `.<name>.old-*/previous` exists, it is renamed back to <name>. Returns the names restored."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    restored = []
    for entry in sorted(folder.iterdir()):
        match = _STALE_FOLDER.match(entry.name)
        if not match or match["kind"] != "old" or (of is not None and match["name"] != of):
            continue
        previous, destination = entry / "previous", folder / match["name"]
        if not os.path.lexists(destination) and previous.is_dir() and not previous.is_symlink():
            os.rename(previous, destination)
            restored.append(match["name"])
    return restored


def remove_stale(folder: str | os.PathLike, of: str | None = None) -> list[str]:
    """Delete the temporary files and folders that interrupted writes left in folder (only those of the destination
    named `of`, when given); returns their names. A destination that a killed swap left moved aside is put back
    first (restore_moved_aside), so what is deleted is never the only copy of a finished output."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    restore_moved_aside(folder, of)
    removed = []
    for entry in folder.iterdir():
        as_file, as_folder = _STALE_FILE.match(entry.name), _STALE_FOLDER.match(entry.name)
        if of is not None and (as_file or as_folder) and (as_file or as_folder)["name"] != of:
            continue
        if as_file and (entry.is_symlink() or entry.is_file()):
            entry.unlink()
        elif as_folder and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            continue
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


def fresh_folder_beside(out_dir: Path) -> Path:
    """A new, empty `.<name>.tmp-XXXXXXXX` folder next to out_dir (permissions as the umask says)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result should look like any other folder
    return tmp


RENAME_EXCHANGE = 2  # <linux/fs.h>: renameat2 swaps the two names atomically
_AT_FDCWD = -100  # <fcntl.h>: paths relative to the working directory
# What renameat2 answers where the kernel, the file system or a sandbox cannot exchange: the fallback's cue.
_CANNOT_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM}


def _load_renameat2():
    """libc's renameat2 (glibc 2.28+, musl 1.2.2+), or None off Linux or where libc lacks it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_RENAMEAT2 = _load_renameat2()


def exchange(first: str | os.PathLike, second: str | os.PathLike) -> bool:
    """Swap what the two existing names refer to, in one atomic step (Linux renameat2 with RENAME_EXCHANGE); False,
    with nothing changed, where the OS, its libc or the file system cannot; OSError for any other failure."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _CANNOT_EXCHANGE:
        return False
    raise OSError(code, os.strerror(code), str(first), None, str(second))


def _sync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename in it) to disk; best effort, as not every file system allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    """Delete what is at path: a folder with its contents, or a file or link (never what a link points to)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        path.unlink()


def swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Put the filled folder tmp at out_dir, so that at every instant out_dir is the complete old or the complete new
    folder; the old one is deleted last.

    An absent out_dir is one rename. An existing one is swapped with tmp by one renameat2(RENAME_EXCHANGE): a single
    atomic step that leaves the new folder at out_dir and the old one at tmp's `.<name>.tmp-*` name, deleted next;
    a kill at any point leaves out_dir complete, and its leftover is a stale folder that the next run's
    remove_stale deletes. Why an exchange rather than a symbolic link flipped to versioned folders (the other way to
    get that guarantee): out_dir stays a plain folder, so the layout users, their copies (`cp -r`, rsync, moved
    data) and the no-link rule above see is unchanged, nothing needs migrating, and no versioned folders pile up.
    Where the exchange is unsupported (non-Linux, an old kernel or libc, some network or FUSE file systems) it
    falls back to two renames: out_dir moved aside into `.<name>.old-*/previous`, then tmp renamed in; a failure
    in between moves it back, and a kill in between leaves it there, where the next run's remove_stale (through
    restore_moved_aside) puts it back before deleting anything.
    """
    if not os.path.lexists(out_dir):
        os.rename(tmp, out_dir)
        _sync_folder(out_dir.parent)
        return
    if exchange(tmp, out_dir):
        _sync_folder(out_dir.parent)
        _remove(tmp)  # the previous folder, now under tmp's stale name
        return
    backup = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.rename(out_dir, backup / "previous")  # a rename: the old folder survives any failure below
    try:
        os.rename(tmp, out_dir)
    except OSError:
        os.rename(backup / "previous", out_dir)
        backup.rmdir()  # only once the old folder is back in place
        raise
    _sync_folder(out_dir.parent)
    shutil.rmtree(backup, ignore_errors=True)


def _sync_files(folder: Path) -> None:
    """fsync every file under folder, so that a swap commits written bytes, not cached ones."""
    for parent, _, names in os.walk(folder):
        for name in names:
            fd = os.open(os.path.join(parent, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


@contextlib.contextmanager
def replacing_folder(out_dir: Path, sync: bool = False) -> Iterator[Path]:
    """Yield a fresh sibling folder to fill; when the block succeeds it replaces out_dir atomically (swap_into_place),
    when it fails it is deleted and out_dir is untouched. sync: fsync every file written into it before the swap."""
    tmp = fresh_folder_beside(out_dir)
    try:
        yield tmp
        if sync:
            _sync_files(tmp)
        swap_into_place(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_atomically(out_dir: Path, files: dict[str, bytes]) -> None:
    """Write `files` (relative name -> bytes) into a fresh sibling folder, then swap it in; on failure
    `out_dir` is untouched."""
    with replacing_folder(out_dir, sync=True) as tmp:
        for name, content in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(content)


def sha256_file(path: str | os.PathLike) -> str:
    """SHA256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
