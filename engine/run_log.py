"""What a run leaves besides checkpoints: train.log (a copy of the console), the console's per-epoch table, and
TensorBoard logs (--tensorboard).

train.log receives every line rank 0 prints to stdout or stderr, without tqdm's progress bars (tqdm draws each
state of a bar with one write that holds a carriage return; those writes, and the newline that ends a finished
bar, are left out). It is appended to on --resume. It is a log, written as it goes, not atomically: a killed run
leaves the lines printed so far. While a run checks what can fail at its start, ConsoleCopy holds the lines in
memory (`hold`); `start` writes them to train.log first, and a start that fails writes no train.log at all.
"""
from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import TextIO

from torch import nn

from utils.errors import SettingError


class _Tee:
    """A text stream that writes to `stream` and copies its lines to `log`, progress bars left out."""

    def __init__(self, stream: TextIO, log: TextIO):
        self.stream, self.log, self.partial = stream, log, ""
        self.after_bar = False  # the last write drew a progress bar

    def write(self, text: str) -> int:
        self.stream.write(text)
        if "\r" in text:  # a bar's redraw (or erasure): the line it shares is the bar's, and text after it starts anew
            self.partial, self.after_bar = "", True
        elif text:
            if self.after_bar and text.startswith("\n"):  # the newline that ends a finished bar
                text = text[1:]
            self.after_bar = False
            *lines, self.partial = (self.partial + text).split("\n")
            for line in lines:
                self.log.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()
        self.log.flush()

    def __getattr__(self, name: str):  # isatty, fileno, encoding, ... of the console stream
        return getattr(self.stream, name)


class ConsoleCopy:
    """Context manager: between start(path) and exit, sys.stdout and sys.stderr are also copied to path; from
    hold() on, lines are kept in memory until start() writes them to path (if it never runs, they go nowhere)."""

    def __init__(self):
        self.file: TextIO | None = None
        self.saved: tuple[TextIO, TextIO] | None = None
        self.held: io.StringIO | None = None

    def _copy_to(self, log: TextIO) -> None:
        if self.saved is None:
            self.saved = sys.stdout, sys.stderr
            sys.stdout, sys.stderr = _Tee(sys.stdout, log), _Tee(sys.stderr, log)
        else:
            sys.stdout.log = sys.stderr.log = log

    def hold(self) -> None:
        """Keep the console's lines in memory from now on, for start() to write first."""
        self.held = io.StringIO()
        self._copy_to(self.held)

    def start(self, path: str | Path, append: bool) -> None:
        """Copy the console to path from now on, the held lines first (append: keep what an earlier part of the run
        wrote)."""
        self.file = open(path, "a" if append else "w", encoding="utf-8", buffering=1)
        if self.held is not None:
            self.file.write(self.held.getvalue())
            self.held = None
        self._copy_to(self.file)

    def __enter__(self) -> "ConsoleCopy":
        return self

    def __exit__(self, *exc) -> None:
        if self.saved is not None:
            for tee in (sys.stdout, sys.stderr):
                if isinstance(tee, _Tee) and tee.partial and self.file is not None:
                    self.file.write(tee.partial + "\n")
            sys.stdout, sys.stderr = self.saved
            self.saved = None
        self.held = None
        if self.file is not None:
            self.file.close()
            self.file = None


# The console's per-epoch table: column groups of (metrics.jsonl key, title, format with the column's width).
# metrics.jsonl keeps every field of a row; the table shows the ones to watch.
EPOCH_COLUMNS = (
    (("loss", "loss", "9.3f"), ("loss_cmpm", "cmpm", "9.3f"), ("loss_cmpc", "cmpc", "9.3f"),
     ("loss_diversity", "diversity", "9.3f"), ("loss_ranking", "ranking", "9.3f"), ("lr_head", "lr head", "8.2e")),
    (("R1", "R@1", "6.2f"), ("R5", "R@5", "6.2f"), ("R10", "R@10", "6.2f"), ("mAP", "mAP", "6.2f"), ("mINP", "mINP", "6.2f")),
    (("seconds", "train s", "7.1f"), ("pairs_per_s", "pairs/s", "7.1f")),
)


def epoch_table_header(split: str) -> str:
    """A legend line and the column titles of the per-epoch table (epoch_table_row)."""
    legend = (f"per epoch: loss = the sum of its weighted parts; lr of the head; text->image retrieval on {split} in %; "
              "* = best R@1 so far (best.pt)")
    return legend + "\n" + _table_line("epoch", [[title for _, title, _ in group] for group in EPOCH_COLUMNS]) + " best"


def epoch_table_row(row: dict, epochs: int, best: bool) -> str:
    """One metrics.jsonl row as a line of the console's table; '-' where the row has no value (no evaluation this
    epoch, no training yet at epoch 0)."""
    cells = [[format(row[key], spec) if key in row else "-" for key, _, spec in group] for group in EPOCH_COLUMNS]
    return _table_line(f"{row['epoch']}/{epochs}", cells) + ("    *" if best else "")


def _table_line(first: str, groups: list[list[str]]) -> str:
    widths = [[int(spec.split(".")[0]) for _, _, spec in group] for group in EPOCH_COLUMNS]
    return f"{first:>7s} " + " | ".join(" ".join(f"{cell:>{width}s}" for cell, width in zip(cells, group_widths))
                                         for cells, group_widths in zip(groups, widths))


def summary_writer_class():
    """torch.utils.tensorboard's SummaryWriter; a SettingError naming the package if it is missing (train.py asks
    before the run writes anything)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # optional dependency: only --tensorboard needs it
    except ImportError:
        raise SettingError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter


def summary_writer(folder: str | Path):
    """A torch.utils.tensorboard.SummaryWriter on folder; a SettingError naming the package if it is missing."""
    return summary_writer_class()(str(folder))


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
