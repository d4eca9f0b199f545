"""benchmarks/gpu_checks.sh on a python that lacks a runtime import (as the GPU image lacks ftfy)."""
from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO


def run_checks(tmp_path, wheels):
    """gpu_checks.sh with ftfy made unimportable by a module that raises on import, and GPU_WHEELS=wheels."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "ftfy.py").write_text("raise ImportError('hidden by the test')\n")
    out = tmp_path / "out"
    env = {**os.environ, "DEVICE": "cpu", "OUT": str(out), "PYTHON": sys.executable, "GPU_WHEELS": str(wheels),
           "PYTHONPATH": str(shim)}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_checks.sh")], env=env, capture_output=True, text=True,
                          timeout=120)
    return done, out


def test_a_missing_import_without_the_wheel_folder_stops_in_one_line_naming_the_prepare_script(tmp_path):
    done, out = run_checks(tmp_path, tmp_path / "no_such_folder")
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot import ftfy" in lines[0] and "bash benchmarks/gpu_prepare.sh" in lines[0], lines
    assert not list(out.glob("*.log")) and not (out / "summary.json").exists()  # no step ran


def test_a_folder_without_the_missing_package_stops_after_the_install_saying_what_is_still_missing(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "ftfy-0.0-py3-none-any.whl").write_bytes(b"")  # its distribution is installed here: left alone
    done, out = run_checks(tmp_path, wheels)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "still cannot import ftfy" in done.stderr
    assert not list(out.glob("*.log"))

