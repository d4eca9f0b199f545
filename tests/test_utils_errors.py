"""utils/errors.py: a user-facing error becomes its one line on stderr and exit status 1 (run_main, and
distributed.run on one process); anything else is a bug and keeps its traceback; a closed output pipe ends
quietly."""
import subprocess
import sys

import pytest

from tests.conftest import REPO
from utils import distributed
from utils.errors import (
    BROKEN_PIPE_STATUS,
    BertFolderError,
    CFineError,
    CheckpointError,
    DataError,
    SearchIndexError,
    SettingError,
    run_main,
)


@pytest.mark.parametrize("kind", [SettingError, DataError, CheckpointError, BertFolderError, SearchIndexError])
@pytest.mark.parametrize("runner", [run_main, distributed.run])
def test_every_kind_of_user_error_is_one_line_and_exit_status_1(kind, runner, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)

    def main(args):
        raise kind(f"{args}: what is wrong, where, and what to do")

    assert runner(main, "--flag x") == 1
    captured = capsys.readouterr()
    assert captured.err == "--flag x: what is wrong, where, and what to do\n" and captured.out == ""
    assert issubclass(kind, CFineError)


def test_the_exit_status_of_main_passes_through_and_bugs_keep_their_traceback(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert run_main(lambda args: 130, None) == 130
    with pytest.raises(ZeroDivisionError):
        distributed.run(lambda args: 1 / 0, None)


def test_the_kinds_stay_what_callers_catch_them_as():
    # SettingError is also a ValueError (argparse types and the settings table raise it as one); the file errors
    # are RuntimeErrors, as the exceptions they replace were.
    assert issubclass(SettingError, ValueError)
    assert all(issubclass(kind, RuntimeError) for kind in (CheckpointError, BertFolderError, SearchIndexError))


def test_a_reader_that_closes_the_pipe_early_ends_the_command_quietly():
    """`search.py query ... | head`: the writer gets BrokenPipeError; no traceback, no 'Exception ignored', status 141."""
    program = ("import sys; from utils.errors import run_main\n"
               "def main(args):\n"
               "    for i in range(10 ** 6):\n"
               "        print(f'{i:08d} a line of ranked results')\n"
               "    return 0\n"
               "sys.exit(run_main(main, None))\n")
    child = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             cwd=REPO)
    assert child.stdout.read(100).startswith(b"00000000 a line")
    child.stdout.close()  # as head does after its lines
    stderr = child.stderr.read().decode()
    assert child.wait(timeout=60) == BROKEN_PIPE_STATUS == 141 and stderr == "", stderr
