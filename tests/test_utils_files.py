"""utils/files.py: what interrupted writes leave is found and removed (and nothing else), a hard link replaces its
target atomically, and the writable-folder check."""
import os

import pytest

from utils import files


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


def test_atomic_link_names_the_same_file_and_replaces_a_planted_link(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    (tmp_path / "last.pt").write_bytes(b"checkpoint")
    (tmp_path / "best.pt").symlink_to(victim)
    files.atomic_link(tmp_path / "last.pt", tmp_path / "best.pt")
    assert victim.read_text() == "keep me" and not (tmp_path / "best.pt").is_symlink()
    assert os.path.samefile(tmp_path / "last.pt", tmp_path / "best.pt")
    assert files.folder_contents(tmp_path) == ["best.pt", "last.pt", "victim"]
