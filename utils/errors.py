"""The one user-facing error type and its kinds. Raised at the boundary (flags, data, checkpoints, BERT folders,
search indexes) with a message that says what is wrong, where, and what to do; each entry point turns it into
that one line on stderr and exit status 1 (`run_main` here; utils/distributed.py `run` under torchrun), never a
traceback."""
from __future__ import annotations

import os
import sys
from typing import Any, Callable


class CFineError(Exception):
    """A problem the user can fix; str(error) is the whole message."""


class SettingError(CFineError, ValueError):
    """A flag or config-file value outside what the settings table allows, or settings that contradict."""


class DataError(CFineError):
    """Raw or processed benchmark data that cannot be used; the message names the file, the record and the fix."""


class CheckpointError(CFineError, RuntimeError):
    """A CLIP weights file or a train.py checkpoint that cannot be used; the message names the file."""


class BertFolderError(CFineError, RuntimeError):
    """A --bert folder that cannot be used; the message says what is missing and how to get it."""


class SearchIndexError(CFineError, RuntimeError):
    """A search index folder that is missing, damaged, or does not belong to the checkpoint in use."""


# Exit status of a command whose reader closed its standard output early (`search.py query ... | head`), as the
# shell reports a process ended by SIGPIPE: 128 + 13.
BROKEN_PIPE_STATUS = 141


def run_main(main: Callable[[Any], int], args: Any) -> int:
    """main(args)'s exit status; a CFineError becomes its message on stderr and exit status 1. A reader that stops
    reading the output (`| head`) ends the command quietly with BROKEN_PIPE_STATUS, as in any Unix tool."""
    try:
        return main(args)
    except CFineError as error:
        print(error, file=sys.stderr)
        return 1
    except BrokenPipeError:
        # What is still buffered for the closed pipe would fail again at exit: point stdout at /dev/null instead.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return BROKEN_PIPE_STATUS
