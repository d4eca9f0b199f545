"""The scripts answer --help and flag errors before importing torch (over 10 s): they parse first."""
import subprocess
import sys

import pytest

from tests.conftest import REPO

# Runs a script as `python SCRIPT ARGS...` would (runpy, __main__), then reports its exit and the heavy modules loaded.
PROBE = """
import runpy, sys
sys.argv = {argv!r}
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
    code = None
except SystemExit as stop:
    code = stop.code
print("EXIT", code, "LOADED", sorted(m for m in ("torch", "numpy", "clip", "models", "matplotlib") if m in sys.modules))
"""


def run_script(*argv: str) -> tuple[str, str]:
    """(stdout, stderr) of the script run in a fresh interpreter."""
    result = subprocess.run([sys.executable, "-c", PROBE.format(argv=list(argv))], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, result.stderr


@pytest.mark.parametrize("argv, shown", [
    (["train.py", "--help"], "--device DEVICE       cpu, cuda or cuda:N (default: cuda when a GPU is visible, else cpu)"),
    (["test.py", "--help"], "--checkpoint CHECKPOINT"),
    (["search.py", "--help"], "{index,query,serve}"),
    (["search.py", "query", "--help"], "--top_k TOP_K"),
])
def test_help_is_printed_without_importing_torch(argv, shown):
    stdout, _ = run_script(*argv)
    assert " ".join(shown.split()) in " ".join(stdout.split())
    assert stdout.strip().endswith("EXIT 0 LOADED []")


@pytest.mark.parametrize("argv, error", [
    (["train.py", "--epochs", "0"], "--epochs: 0 is not allowed; epochs takes an integer >= 1"),
    (["train.py", "--amp", "fp8"], '--amp: "fp8" is not allowed'),
    (["test.py", "--split", "train"], "argument --split: invalid choice: 'train'"),
    (["search.py", "query", "--index", "x"], "the following arguments are required: SENTENCE"),
])
def test_flag_errors_are_answered_without_importing_torch(argv, error):
    stdout, stderr = run_script(*argv)
    assert error in stderr and stdout.strip().endswith("EXIT 2 LOADED []")
