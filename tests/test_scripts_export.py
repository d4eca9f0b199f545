"""scripts/export.py: the command writes its folder atomically, replaces a non-empty one only with --overwrite, never
writes through a link, leaves the old folder whole when it fails, and says what is wrong in one line."""
import json
import os
import subprocess
import sys

import pytest

from export import export_folder
from scripts import export as export_script
from tests.conftest import REPO
from tests.test_cli_help import run_script
from utils.errors import run_main
from utils.files import sha256_file

pytestmark = pytest.mark.usefixtures("module_single_thread")


def run_export(*argv) -> int:
    return run_main(export_script.main, export_script.get_args_parser().parse_args([str(a) for a in argv]))


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_help_and_flag_errors_answer_without_importing_torch():
    stdout, _ = run_script("scripts/export.py", "--help")
    assert "--format {onnx,torchscript}" in stdout and stdout.strip().endswith("EXIT 0 LOADED []")
    stdout, stderr = run_script("scripts/export.py", "--checkpoint", "x.pt", "--format", "tflite", "--out", "o")
    assert "argument --format: invalid choice: 'tflite'" in stderr and stdout.strip().endswith("EXIT 2 LOADED []")


def test_the_folder_is_replaced_only_with_overwrite_and_whole(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    out = tmp_path / "exported"
    assert run_export("--checkpoint", tiny_checkpoint, "--format", "torchscript", "--out", out) == 0
    summary = capsys.readouterr().out
    manifest = json.loads((out / "export.json").read_text())
    assert "torchscript encoders exported and checked" in summary and all(name in summary for name in manifest["files"])
    assert sorted(os.listdir(tmp_path)) == ["exported"]  # no temporary sibling left

    (out / "notes.txt").write_text("mine")
    assert run_export("--checkpoint", tiny_checkpoint, "--format", "torchscript", "--out", out) == 1
    assert "is not empty: pass --overwrite" in one_line_error(capsys) and (out / "notes.txt").is_file()

    (tmp_path / ".exported.tmp-killed01").mkdir()  # what a killed export leaves
    assert run_export("--checkpoint", tiny_checkpoint, "--format", "torchscript", "--out", out, "--overwrite") == 0
    assert not (out / "notes.txt").exists() and sorted(os.listdir(tmp_path)) == ["exported"]

    before = {p.name: sha256_file(p) for p in out.iterdir()}

    def disk_full(folder, manifest):  # the last file of the new folder
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_folder, "write_manifest", disk_full)
    assert run_export("--checkpoint", tiny_checkpoint, "--format", "torchscript", "--out", out, "--overwrite") == 1
    error = one_line_error(capsys)
    assert "could not be written (" in error and "No space left on device" in error and "is unchanged" in error
    assert {p.name: sha256_file(p) for p in out.iterdir()} == before and sorted(os.listdir(tmp_path)) == ["exported"]


@pytest.mark.parametrize("make, message", [
    (lambda out: out.write_text("a file"), "is a file, not a folder"),
    (lambda out: out.symlink_to(out.parent / "elsewhere", target_is_directory=True), "is a symbolic link"),
])
def test_an_out_that_is_no_folder_is_refused(make, message, tiny_checkpoint, tmp_path, capsys):
    (tmp_path / "elsewhere").mkdir()
    make(tmp_path / "out")
    assert run_export("--checkpoint", tiny_checkpoint, "--format", "torchscript", "--out", tmp_path / "out",
                      "--overwrite") == 1
    assert message in one_line_error(capsys) and os.listdir(tmp_path / "elsewhere") == []


def test_python_dash_m_exports_and_errors_are_one_line(tiny_checkpoint, tmp_path):
    out = tmp_path / "exported"
    done = subprocess.run([sys.executable, "-m", "scripts.export", "--checkpoint", str(tiny_checkpoint), "--format",
                           "torchscript", "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and (out / "export.json").is_file(), done.stderr[-2000:]
    failed = subprocess.run([sys.executable, "-m", "scripts.export", "--checkpoint", str(tmp_path / "missing.pt"),
                             "--format", "onnx", "--out", str(tmp_path / "other")], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert failed.returncode == 1 and failed.stderr.count("\n") == 1 and "no such checkpoint file" in failed.stderr
    assert not (tmp_path / "other").exists()
