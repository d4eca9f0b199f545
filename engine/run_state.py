"""Where a training run stands, and the one dict per checkpoint that holds it: what --resume restores exactly
(model, optimiser, schedule, scaler, RNG, position, history) and what test.py rebuilds the model from."""
from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass, field
from pathlib import Path

from engine import settings as settings_table
from engine.control import rng_state, set_rng_state
from engine.data import TrainData
from engine.step_guard import StepGuard
from models.cfine import CFine
from models.checkpoint import load_checkpoint
from utils import distributed
from utils.errors import CheckpointError


@dataclass
class RunState:
    """Where the run stands: finished epochs, finished steps of the next one, the metrics so far, the best epoch."""

    epoch: int = 0
    step_in_epoch: int = 0
    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"R1": -1.0, "epoch": None})
    saved: Path | None = None  # the checkpoint that holds this run's latest good state
    skipped_steps: int = 0  # steps skipped for non-finite values, in all and in a row (StepGuard's counts)
    nonfinite_in_a_row: int = 0
    epoch_sums: dict | None = None  # the running loss sums of the step_in_epoch steps done (engine/loop.py)

    def finish_epoch(self, row: dict) -> bool:
        """Record a finished epoch's row; True if its R@1 is the best so far (so best.pt is due)."""
        self.epoch, self.step_in_epoch, self.epoch_sums = row["epoch"], 0, None
        self.history.append(row)
        improved = "R1" in row and row["R1"] > self.best["R1"]
        if improved:
            self.best = {"R1": row["R1"], "epoch": row["epoch"]}
        return improved


def run_settings(args: argparse.Namespace) -> tuple[argparse.Namespace, dict | None]:
    """(the run's settings, the checkpoint to continue or None): the flags' settings, or with --resume the
    checkpoint's (engine/settings.py says which and how); --output_dir and --data_root resolved. args is unchanged."""
    settings = copy.copy(args)
    resumed = None
    if args.resume:
        resumed = load_checkpoint(args.resume)
        check_resumable(resumed, args.resume)
        settings_table.apply_checkpoint(settings, resumed["args"], args.resume)
    if settings.output_dir is None:
        settings.output_dir = str(Path(args.resume).parent if args.resume else
                                  Path("runs") / settings.dataset.lower().replace("-", "_"))
    settings.data_root = str(Path(settings.data_root or "processed_data").resolve())
    return settings, resumed


# What a checkpoint needs for --resume to continue its run (besides args, its settings); written by make_checkpoint.
RESUME_KEYS = ("model", "optimizer", "scheduler", "scaler", "rng", "epoch", "step_in_epoch", "history", "best",
               "config")


def check_resumable(state: dict, path: str) -> None:
    """CheckpointError unless the checkpoint holds what --resume continues a run from: its settings (args, with the
    dataset) and train.py's state of the run (RESUME_KEYS, the config with its class count)."""
    saved = state.get("args")
    if not isinstance(saved, dict) or "dataset" not in saved:
        raise CheckpointError(f"--resume {path}: the checkpoint does not record its run's settings "
                              f"({'args.dataset' if isinstance(saved, dict) else 'args'}); resume from a last.pt or "
                              "best.pt that train.py wrote, or start a new run")
    missing = [key for key in RESUME_KEYS if key not in state]
    if "config" in state and not (isinstance(state["config"], dict) and "num_classes" in state["config"]):
        missing.append("config.num_classes")
    if missing:
        raise CheckpointError(f"--resume {path}: the checkpoint lacks {', '.join(missing)} (train.py's state of a "
                              "run, needed to continue it); resume from a last.pt or best.pt that train.py wrote, or "
                              "start a new run")


def restore_run(state: dict, model, optimizer, scheduler, scaler, settings: argparse.Namespace,
                info: distributed.DistInfo) -> RunState:
    """Load a checkpoint's model, optimiser, schedule, scaler and RNG states; the run's position and history."""
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as error:  # a hand-made or foreign state
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise CheckpointError(f"--resume {settings.resume}: its state does not fit the run it describes "
                              f"({type(error).__name__}: {first_line}); resume from a last.pt or best.pt that train.py "
                              "wrote, or start a new run") from None
    run = RunState(state["epoch"], state["step_in_epoch"], state["history"], state["best"], Path(settings.resume),
                   state.get("skipped_steps", 0), state.get("nonfinite_in_a_row", 0),
                   state.get("epoch_sums") if state["step_in_epoch"] > 0 else None)
    saved_world = state.get("world_size", 1)
    if saved_world != info.world_size and run.step_in_epoch > 0:
        raise CheckpointError(f"--resume {settings.resume}: saved by {saved_world} process(es) in the middle of epoch "
                              f"{run.epoch + 1}, whose batches depend on the process count; resume it with "
                              f"{saved_world} process(es) (torchrun --nnodes x --nproc_per_node), or resume from a "
                              "checkpoint saved at the end of an epoch")
    if info.is_main:
        print(f"resumed {settings.resume}: epoch {run.epoch + 1} of {settings.epochs}, after {run.step_in_epoch} steps "
              "of it")
        if run.step_in_epoch > 0 and run.epoch_sums is None:
            print(f"note: {settings.resume} was saved mid-epoch before checkpoints carried the epoch's running loss "
                  f"sums: epoch {run.epoch + 1}'s logged losses average its steps after this resume only")
        if saved_world != info.world_size:
            print(f"note: trained so far by {saved_world} process(es), now {info.world_size}: the global batch "
                  f"changes from {settings.batch_size * saved_world} to {settings.batch_size * info.world_size}")
    return run


def make_checkpoint(model: CFine, optimizer, scheduler, scaler, guard: StepGuard, run: RunState,
                    settings: argparse.Namespace, data: TrainData) -> dict:
    """One dict per checkpoint: what --resume continues from, and the config test.py rebuilds the model from."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "epoch": run.epoch, "step_in_epoch": run.step_in_epoch, "rng": rng_state(),
            "config": model.config.to_dict(), "text_vocab": model.text_vocab, "args": settings_table.as_dict(settings),
            "history": run.history, "best": run.best, "eval_split": data.eval_split,
            "world_size": distributed.get_world_size(), "data": data.identity, "skipped_steps": guard.total,
            "nonfinite_in_a_row": guard.in_a_row, "epoch_sums": run.epoch_sums}
