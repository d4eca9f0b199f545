"""What a run leaves besides checkpoints: train.log (a copy of the console) and TensorBoard logs (--tensorboard).

train.log receives every line rank 0 prints to stdout or stderr, without tqdm's progress bars (a bar redraws
itself with carriage returns, so lines holding a '\\r' are left out). It is appended to on --resume. It is a log,
written as it goes, not atomically: a killed run leaves the lines printed so far.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from torch import nn


class _Tee:
    """A text stream that writes to `stream` and copies complete lines without '\\r' to `log`."""

    def __init__(self, stream: TextIO, log: TextIO):
        self.stream, self.log, self.partial = stream, log, ""

    def write(self, text: str) -> int:
        self.stream.write(text)
        *lines, self.partial = (self.partial + text).split("\n")
        for line in lines:
            if "\r" not in line:  # a progress bar's redraw
                self.log.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()
        self.log.flush()

    def __getattr__(self, name: str):  # isatty, fileno, encoding, ... of the console stream
        return getattr(self.stream, name)


class ConsoleCopy:
    """Context manager: between start(path) and exit, sys.stdout and sys.stderr are also copied to path."""

    def __init__(self):
        self.file: TextIO | None = None
        self.saved: tuple[TextIO, TextIO] | None = None

    def start(self, path: str | Path, append: bool) -> None:
        """Copy the console to path from now on (append: keep what an earlier part of the run wrote)."""
        self.file = open(path, "a" if append else "w", encoding="utf-8", buffering=1)
        self.saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(sys.stdout, self.file), _Tee(sys.stderr, self.file)

    def __enter__(self) -> "ConsoleCopy":
        return self

    def __exit__(self, *exc) -> None:
        if self.saved is not None:
            for tee in (sys.stdout, sys.stderr):
                if isinstance(tee, _Tee) and tee.partial and "\r" not in tee.partial:
                    self.file.write(tee.partial + "\n")
            sys.stdout, sys.stderr = self.saved
            self.saved = None
        if self.file is not None:
            self.file.close()
            self.file = None


def summary_writer(folder: str | Path):
    """A torch.utils.tensorboard.SummaryWriter on folder; SystemExit naming the package if it is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # optional dependency: only --tensorboard needs it
    except ImportError:
        raise SystemExit("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(str(folder))


class TrainingBoard:
    """TensorBoard scalars of a run: every epoch's row (losses, learning rates, metrics) and the loss every K steps.

    The step loss is read by a forward hook on the model at every K-th training forward only, so the other
    steps add no host-device synchronisation. Use as a context manager (closes the writer, removes the hook).
    """

    def __init__(self, folder: str | Path, model: nn.Module, every: int, steps_done: int = 0):
        self.writer = summary_writer(folder)
        self.every, self.step = every, steps_done
        self.hook = model.register_forward_hook(self._after_forward)

    def _after_forward(self, module: nn.Module, inputs, out) -> None:
        if not module.training:
            return
        self.step += 1
        if self.step % self.every == 0:
            self.writer.add_scalar("step/loss", float(out.loss.detach()), self.step)

    def log_epoch(self, row: dict) -> None:
        """One metrics.jsonl row as scalars at step = its epoch: loss/*, lr/*, <eval_split>/* (R1, mAP, ...)."""
        split = row.get("eval_split", "eval")
        for key, value in row.items():
            if key == "epoch" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            group = "loss" if key.startswith("loss") else "lr" if key.startswith("lr_") else \
                "train" if key in ("skipped_steps", "seconds", "pairs_per_s") else split
            self.writer.add_scalar(f"{group}/{key}", value, row["epoch"])
        self.writer.flush()

    def __enter__(self) -> "TrainingBoard":
        return self

    def __exit__(self, *exc) -> None:
        self.hook.remove()
        self.writer.close()
