"""utils/files.py: what interrupted writes leave is found and removed (and nothing else), a folder swap that leaves
the name complete at every instant, files written together (all or none), a hard link that replaces its target
atomically, and the writable-folder check."""
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from utils import files

REPO = Path(files.__file__).resolve().parents[1]


def test_stale_temporary_files_are_found_and_removed_and_nothing_else(tmp_path):
    stale = [".last.pt.k3j_9zq1.tmp", ".metrics.jsonl.abcdefgh.tmp", ".write-check.0a1b2c3d.tmp"]
    kept = ["last.pt", "notes.tmp", ".hidden", ".last.pt.tmp", "x.abcdefgh.tmp"]
    for name in stale + kept:
        (tmp_path / name).write_text("x")
    assert files.folder_contents(tmp_path) == sorted(kept)
    assert files.remove_stale(tmp_path) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
    assert files.remove_stale(tmp_path / "absent") == []


def test_writable_folder_check_creates_the_folder_and_fails_on_a_file(tmp_path):
    files.check_writable_folder(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir() and list((tmp_path / "a" / "b").iterdir()) == []
    (tmp_path / "plain").write_text("x")
    with pytest.raises(OSError):
        files.check_writable_folder(tmp_path / "plain")


def test_stale_folders_of_one_destination_are_removed_and_other_names_kept(tmp_path):
    stale = [".CUHK-PEDES.tmp-ab12cd_3", ".CUHK-PEDES.old-zz99yy00", ".CUHK-PEDES.k3j_9zq1.tmp"]
    other = [".RSTPReid.tmp-ab12cd_3", "CUHK-PEDES", ".CUHK-PEDES.tmp-short"]
    for name in stale[:2] + other[:3]:
        (tmp_path / name).mkdir()
    (tmp_path / stale[2]).write_text("half a file")
    assert files.remove_stale(tmp_path, of="CUHK-PEDES") == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(other)


def test_files_written_together_replace_all_or_none(tmp_path):
    first, second, planted_target = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "elsewhere"
    first.write_bytes(b"old a")
    planted_target.write_bytes(b"not mine")
    second.symlink_to(planted_target)
    calls = []

    def failing(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match=r"No space left on device: '.*b\.json'"):
        files.write_together({first: lambda f: f.write(b"new a"), second: failing}, lambda: calls.append("deleted"))
    assert first.read_bytes() == b"old a" and second.is_symlink() and calls == []  # nothing replaced, nothing deleted
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json", "elsewhere"]  # no temporary file left

    def replaced_yet():
        calls.append(first.read_bytes())

    files.write_together({first: lambda f: f.write(b"new a"), second: files.json_writer({"b": 1})}, replaced_yet)
    assert calls == [b"old a"]  # before_replacing ran once every file was written, before any rename
    assert first.read_bytes() == b"new a" and not second.is_symlink() and second.read_text() == '{\n  "b": 1\n}\n'
    assert planted_target.read_bytes() == b"not mine"


def test_atomic_link_names_the_same_file_and_replaces_a_planted_link(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    (tmp_path / "last.pt").write_bytes(b"checkpoint")
    (tmp_path / "best.pt").symlink_to(victim)
    files.atomic_link(tmp_path / "last.pt", tmp_path / "best.pt")
    assert victim.read_text() == "keep me" and not (tmp_path / "best.pt").is_symlink()
    assert os.path.samefile(tmp_path / "last.pt", tmp_path / "best.pt")
    assert files.folder_contents(tmp_path) == ["best.pt", "last.pt", "victim"]


# A process that replaces folder X with write_atomically and is killed (SIGKILL: no finally, no clean-up) right after
# its kill_at-th step: a file written, a rename, the rename-exchange, a removal.
KILLED_WRITER = r"""
import os, shutil, signal, sys
from pathlib import Path
from utils import files

out, kill_at, mode = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
steps = 0

def step(function):
    def counted(*args, **kwargs):
        global steps
        result = function(*args, **kwargs)
        steps += 1
        if steps == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    return counted

if mode == "fallback":  # as on a file system without RENAME_EXCHANGE
    files.exchange = lambda a, b: False
elif hasattr(files, "exchange"):
    files.exchange = step(files.exchange)
for name in ("rename", "fsync", "unlink", "rmdir"):
    setattr(os, name, step(getattr(os, name)))
shutil.rmtree = step(shutil.rmtree)
files.write_atomically(out, {"a.json": b"new", "sub/b.json": b"new"})
"""
OLD = {"a.json": b"old", "sub/b.json": b"old", "sub/c.json": b"old"}
NEW = {"a.json": b"new", "sub/b.json": b"new"}


def _contents(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("mode", ["exchange", "fallback"])
def test_a_kill_at_any_step_of_the_swap_leaves_a_complete_folder_and_the_next_run_cleans_up(tmp_path, mode):
    """Killed after every step in turn: under its name the dataset folder is always the complete old or the complete
    new one (with the rename-exchange; the two-rename fallback may leave it moved aside, and the next run's
    remove_stale puts it back), and the next run removes every leftover."""
    parent, finished, kills = tmp_path / "processed_data", False, 0
    for kill_at in range(1, 40):
        shutil.rmtree(parent, ignore_errors=True)
        files.write_atomically(parent / "X", OLD)
        run = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(parent / "X"), str(kill_at), mode],
                             cwd=REPO, capture_output=True, text=True, timeout=60)
        if run.returncode == 0:
            finished = True
            break
        assert run.returncode == -signal.SIGKILL, run.stderr
        kills += 1
        left = sorted(p.name for p in parent.iterdir())
        moved_aside = mode == "fallback" and not (parent / "X").exists()
        before = OLD if moved_aside else _contents(parent / "X")
        assert before in (OLD, NEW), (kill_at, left)
        files.remove_stale(parent, of="X")  # what the next run does first
        assert [p.name for p in parent.iterdir()] == ["X"], (kill_at, left)
        assert _contents(parent / "X") == before, (kill_at, left)
    assert finished and kills >= 4 and _contents(parent / "X") == NEW


def test_an_existing_folder_is_replaced_by_one_rename_exchange(tmp_path, monkeypatch):
    """Where the kernel and file system support it, the swap is one atomic renameat2(RENAME_EXCHANGE) and never
    the two renames that leave the name missing in between."""
    files.write_atomically(tmp_path / "X", OLD)
    renames = []
    real_rename = os.rename
    monkeypatch.setattr(files.os, "rename", lambda *a: (renames.append(a), real_rename(*a)))
    files.write_atomically(tmp_path / "X", NEW)
    assert renames == [] and _contents(tmp_path / "X") == NEW
    assert [p.name for p in tmp_path.iterdir()] == ["X"]


def test_a_folder_moved_aside_by_a_killed_fallback_swap_is_put_back(tmp_path):
    (tmp_path / ".X.old-ab12cd_3" / "previous").mkdir(parents=True)
    (tmp_path / ".X.old-ab12cd_3" / "previous" / "meta.json").write_text("{}")
    (tmp_path / ".X.tmp-zz99yy00").mkdir()
    assert files.remove_stale(tmp_path, of="X") == [".X.old-ab12cd_3", ".X.tmp-zz99yy00"]
    assert [p.name for p in tmp_path.iterdir()] == ["X"] and (tmp_path / "X" / "meta.json").read_text() == "{}"
