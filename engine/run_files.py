"""A training run's folder: claiming it (never overwriting a run unasked), the files written at its start
(config.json, environment.json, held_out_ids.json), and each epoch's last.pt, best.pt and metrics.jsonl, every one
written atomically (utils/files.py)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from engine import settings as settings_table
from engine.data import TrainData
from engine.environment import environment_records
from models.cfine import CFine
from models.checkpoint import save_checkpoint
from utils.distributed import DistInfo
from utils.errors import CFineError, CheckpointError, SettingError
from utils.files import atomic_link, atomic_write, check_writable_folder, folder_contents, json_writer, remove_stale, write_together

# What --overwrite deletes (delete_run_files, with tb/'s event files); train.log is started afresh.
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "config.json", "environment.json", "held_out_ids.json")


def claim_output_dir(settings: argparse.Namespace, info: DistInfo) -> Path:
    """The run's folder: the checkpoint's on --resume; a new run needs it empty unless --overwrite. Only checks (and
    creates the folder, to prove it writable): an overwritten run's files are deleted by start_output, once the run
    has passed every check of its start."""
    output_dir = Path(settings.output_dir)
    continuing = bool(settings.resume) and Path(settings.resume).resolve().parent == output_dir.resolve()
    if continuing and settings.overwrite:
        raise SettingError(f"--overwrite would delete the run that --resume {settings.resume} continues; drop one of them")
    contents = folder_contents(output_dir) if info.is_main else []
    if contents and not continuing and not settings.overwrite:
        listed = ", ".join(contents[:4]) + (", ..." if len(contents) > 4 else "")
        if not (output_dir / "last.pt").is_file():  # a run stopped before its first checkpoint, or other files
            raise SettingError(f"--output_dir {output_dir} is not empty ({listed}) but holds no checkpoint to resume: "
                               "pass --overwrite to replace the run files there, or choose another --output_dir")
        raise SettingError(f"--output_dir {output_dir} is not empty ({listed}): pass --resume {output_dir / 'last.pt'} "
                           "to continue the run there, --overwrite to replace it, or choose another --output_dir")
    if info.is_main:
        try:
            check_writable_folder(output_dir)
        except OSError as error:
            raise SettingError(f"--output_dir {output_dir}: cannot write there ({error})") from None
        remove_stale(output_dir)  # left by a run killed while writing
    return output_dir


def start_output(output_dir: Path, settings: argparse.Namespace, model: CFine, data: TrainData, info, device, amp: str, epoch: int) -> None:
    """Rank 0, once the run has passed every check of its start: write config.json, environment.json (and the
    held-out ids), deleting an overwritten run's files only once those are written, then say what will run and which
    split selects best.pt. A full disk here is one line, with nothing in the folder changed (an overwritten run
    included)."""
    environment = environment_records(None if settings.overwrite else output_dir / "environment.json",
                                      start_epoch=epoch, resumed_from=settings.resume)
    files = {output_dir / "config.json": {"args": settings_table.as_dict(settings), "model": model.config.to_dict()},
             output_dir / "environment.json": environment}
    if data.held_out_ids:
        files[output_dir / "held_out_ids.json"] = {"dataset": settings.dataset, "seed": settings.seed,
                                                   "held_out_ids": data.held_out_ids}
    try:
        write_together({path: json_writer(value) for path, value in files.items()},
                       before_replacing=(lambda: delete_run_files(output_dir)) if settings.overwrite else None)
    except OSError as error:
        raise CFineError(f"{error.filename or output_dir}: could not be written ({error.strerror or error}); nothing "
                         f"in {output_dir} was changed: free disk space, then run the same command again") from None
    print(f"{settings.dataset}: {len(data.loader.dataset)} training pairs, {data.loader.dataset.num_classes} ids, "
          f"{data.loader.sampler.batches_per_epoch} steps/epoch, global batch {settings.batch_size * info.world_size} "
          f"({settings.batch_size} per process x {info.world_size} process(es)); device {device}, amp {amp}; "
          f"evaluating on {data.eval_split}; writing to {output_dir}")
    if settings.chunk_size and settings.chunk_size < settings.batch_size:
        print(f"gradient caching: encoders run {settings.chunk_size} pairs at a time (twice), the head and losses see the "
              f"whole batch of {settings.batch_size}: the same step with less memory")
    elif settings.chunk_size:
        print(f"--chunk_size {settings.chunk_size} is the whole batch: the plain step, without gradient caching")
    if data.eval_split == "val_carved":
        print(f"{settings.dataset} has no val split: {len(data.held_out_ids)} training ids held out as val (from seed "
              f"{settings.seed}, listed in {output_dir / 'held_out_ids.json'}); best.pt is selected on them and the "
              "test split is not looked at during training")
    if data.eval_split == "test":
        print(f"WARNING: --select_on test: evaluating and selecting best.pt on the TEST split of {settings.dataset}; "
              "its test numbers are not held-out results (recorded as eval_split 'test')", file=sys.stderr)
    if info.enabled:
        print(f"DDP over {info.world_size} processes ({'NCCL' if device.type == 'cuda' else 'Gloo'}): losses on "
              f"{'the global batch (--gather_features)' if settings.gather_features else 'each process batch'}, "
              f"BN statistics {'of the global batch (--sync_bn)' if settings.sync_bn else 'per process'}")


def delete_run_files(output_dir: Path) -> None:
    """What --overwrite deletes of an earlier run: RUN_FILES and tb/'s event files (train.log is started afresh)."""
    for name in RUN_FILES:
        (output_dir / name).unlink(missing_ok=True)
    for events in (output_dir / "tb").glob("events.out.tfevents.*"):
        events.unlink()


def save_files(output_dir: Path, state: dict, *, best: bool = False, history: list[dict] | None = None) -> None:
    """last.pt (best.pt: a hard link to it), then metrics.jsonl, each atomically; a failure leaves every previous
    file valid. The checkpoint's write time and size go into the last history row (checkpoint_s, checkpoint_mib).

    best.pt is the same file as last.pt when the epoch is the best so far: written once, not twice (at ViT-B/16
    with Adam's state about 1.8 GiB), and `--resume best.pt` continues from it exactly as from last.pt.
    """
    try:
        started = time.perf_counter()
        save_checkpoint(state, output_dir / "last.pt")
        if best:
            atomic_link(output_dir / "last.pt", output_dir / "best.pt")
        if history:
            history[-1].update(checkpoint_s=round(time.perf_counter() - started, 3),
                               checkpoint_mib=round((output_dir / "last.pt").stat().st_size / 2**20, 1))
        if history is not None:
            atomic_write(output_dir / "metrics.jsonl", lambda f: f.write("".join(json.dumps(r) + "\n" for r in history).encode()))
    except OSError as error:
        raise CheckpointError(f"{output_dir / 'metrics.jsonl'}: could not be written ({error}); free disk space") from None
