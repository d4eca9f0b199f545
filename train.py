"""Train CFine on a processed benchmark (bash data.sh first). Runs unchanged under torchrun (DDP).

    python train.py --config configs/cuhk_pedes.json --data_root processed_data --output_dir runs/cuhk
    python train.py --resume runs/cuhk/last.pt              # continue that run exactly, with its own settings
    python train.py --resume runs/cuhk/last.pt --epochs 60  # ... and extend it to 60 epochs
    torchrun --standalone --nproc_per_node 4 train.py --config configs/cuhk_pedes.json --batch_size 8

Every setting, what it allows, its default and what --resume does with it: engine/settings.py. A new run needs an
empty --output_dir (or --overwrite). The training run's pieces live in engine/: data.py, model_setup.py, loop.py
(the epoch and its step), grad_cache.py, step_guard.py, run_state.py (the checkpoint dict), run_files.py.
"""
from __future__ import annotations

# ruff: noqa: E402 (the flags are parsed before the heavy imports: see below)
import argparse
import contextlib
import sys
from pathlib import Path

from engine import settings as settings_table


def get_args_parser() -> argparse.ArgumentParser:
    """Flags built from engine/settings.py's table (TRAIN_SETTINGS)."""
    return settings_table.get_args_parser("Train CFine (text-to-image person retrieval)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Defaults < --config file < explicit flags, every value checked against the settings table."""
    return settings_table.parse(get_args_parser(), argv)


# Run as a script, train.py reads its flags before the imports below, which load torch (over 10 s): --help and a
# mistyped flag answer at once. Imported as a module (tests, benchmarks), it defines everything as usual.
if __name__ == "__main__":
    ARGS = parse_args()

import torch

from engine import run_log
from engine.control import StopRequest, TrainingStopped, seed_everything
from engine.data import build_data, check_resumed_data
from engine.loop import evaluate, train_one_epoch
from engine.model_setup import run_model, run_tokenizer
from engine.run_files import claim_output_dir, save_files, start_output
from engine.run_state import RunState, make_checkpoint, restore_run, run_settings
from engine.step_guard import StepGuard, TrainingDiverged
from models.gather import convert_to_global_bn
from models.optim import build_optimizer
from models.precision import compiled, resolve_amp, use_tf32
from utils import distributed
from utils.errors import CFineError


def main(args: argparse.Namespace) -> int:
    """Train; rank 0's console is copied to <output_dir>/train.log, and --tensorboard writes <output_dir>/tb/.

    Nothing is written into the output folder (an --overwrite deletes nothing) until the run has passed every check
    of its start: a start that fails leaves the folder as it was (a folder it made is removed again), so
    the same command with the problem fixed runs. The lines printed meanwhile reach train.log once it starts.
    """
    settings, resumed = run_settings(args)  # the run's settings: the flags', or with --resume the checkpoint's
    if resumed is not None and resumed["epoch"] >= settings.epochs:
        print(f"{args.resume}: the run finished all {settings.epochs} epochs; pass --epochs N (> {settings.epochs}) "
              "to extend it")
        return 0
    info, device = distributed.init_distributed(settings.device)
    if resumed is not None:
        check_resumed_data(settings, resumed)
    output_dir = Path(settings.output_dir)
    made_folder = info.is_main and not output_dir.exists()
    with contextlib.ExitStack() as closing:
        console = closing.enter_context(run_log.ConsoleCopy()) if info.is_main else None
        if console:
            console.hold()  # until train.log starts below
        # Everything that can fail at the start, writing nothing: the folder's check, precision, seeds, data,
        # model, optimiser, the resumed state, and (--tensorboard) the package its logs need; then the start's files.
        try:
            claim_output_dir(settings, info)
            amp = resolve_amp(settings.amp, device)
            use_tf32(settings.tf32)
            seed_everything(settings.seed)
            data = build_data(settings, info, run_tokenizer(settings, resumed), resumed)
            model = run_model(settings, resumed, data.loader.dataset.num_classes).to(device)
            if settings.sync_bn:
                convert_to_global_bn(model)
            model.head.gather_features = settings.gather_features
            optimizer, scheduler = build_optimizer(
                model, lr_head=settings.lr_head, lr_image=settings.lr_image, lr_text=settings.lr_text,
                wd_image=settings.wd_image, warmup_epochs=settings.warmup_epochs, warmup_start=settings.warmup_start,
                milestones=tuple(settings.milestones), gamma=settings.gamma)
            scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
            run = restore_run(resumed, model, optimizer, scheduler, scaler, settings, info) if resumed else RunState()
            guard = StepGuard(model, settings.max_nonfinite, run.skipped_steps, run.nonfinite_in_a_row)
            # The step runs the DDP wrapper, compiled as a whole (DDP's graph splitting at bucket boundaries keeps
            # the gradient all-reduce overlapped with backward); checkpoints and evaluation use the plain module.
            step_model = compiled(distributed.wrap_ddp(model, device), settings.compile)
            if settings.tensorboard and info.is_main:
                run_log.summary_writer_class()
            if info.is_main:  # the start's files (--overwrite deletes now): all written, or nothing changed
                start_output(output_dir, settings, model, data, info, device, amp, run.epoch)
        except BaseException:
            if made_folder:
                with contextlib.suppress(OSError):
                    output_dir.rmdir()  # made by claim_output_dir's check, and still empty
            raise
        progress = info.is_main and not settings.no_progress

        board = None
        if info.is_main:
            console.start(output_dir / "train.log", append=bool(settings.resume) and not settings.overwrite)
            if settings.tensorboard:
                steps_done = run.epoch * data.loader.sampler.batches_per_epoch + run.step_in_epoch
                board = closing.enter_context(run_log.TrainingBoard(output_dir / "tb", model, settings.log_every,
                                                                    steps_done))
            print(run_log.epoch_table_header(data.eval_split))
        if settings.eval_at_start and run.epoch == 0 and run.step_in_epoch == 0 and not run.history:
            run.history.append({"epoch": 0, **evaluate(model, data, settings, device, amp, progress)})
            if board:
                board.log_epoch(run.history[-1])
            if info.is_main:
                print(run_log.epoch_table_row(run.history[-1], settings.epochs, best=False))

        # The loop: train an epoch, step the schedule, evaluate when due, save; a signal saves and stops.
        with StopRequest() as stop:
            try:
                for epoch in range(run.epoch, settings.epochs):
                    data.loader.sampler.set_epoch(epoch, start_batch=run.step_in_epoch)
                    row = train_one_epoch(step_model, data.loader, optimizer, scaler, guard, stop, device=device,
                                          amp=amp, epoch=epoch, start_step=run.step_in_epoch, progress=progress,
                                          chunk_size=settings.chunk_size, carried=run.epoch_sums)
                    scheduler.step()
                    distributed.broadcast_buffers(model)  # every rank now holds what rank 0 saves below
                    if (epoch + 1) % settings.eval_every == 0 or epoch + 1 == settings.epochs:
                        row.update(evaluate(model, data, settings, device, amp, progress))
                    improved = run.finish_epoch(row)
                    if board:
                        board.log_epoch(row)
                    if info.is_main:
                        checkpoint = make_checkpoint(model, optimizer, scheduler, scaler, guard, run, settings, data)
                        save_files(output_dir, checkpoint, best=improved, history=run.history)
                        print(run_log.epoch_table_row(row, settings.epochs, improved))  # once saved: it is in last.pt
                    run.saved = output_dir / "last.pt"
            except TrainingStopped as stopped:
                run.step_in_epoch, run.epoch_sums = stopped.step, stopped.epoch_sums  # the resumed epoch goes on from them
                if info.is_main:
                    save_files(output_dir, make_checkpoint(model, optimizer, scheduler, scaler, guard, run, settings,
                                                           data))
                    launcher = "torchrun ... train.py" if info.enabled else "python train.py"
                    print(f"stopped by {stop.signal_name or 'a signal to another process'} at epoch {run.epoch + 1}, "
                          f"step {stopped.step}; state saved to {output_dir / 'last.pt'}. Resume with: {launcher} "
                          f"--resume {output_dir / 'last.pt'}", file=sys.stderr)
                distributed.cleanup()  # torchrun stops a group as soon as one rank exits non-zero: last.pt is written
                return 130 if stop.signal_name == "SIGINT" else 143
            except TrainingDiverged as diverged:
                kept = f"{run.saved} holds the last good state" if run.saved else "no checkpoint of this run was written yet"
                raise CFineError(f"training diverged at epoch {run.epoch + 1}: {diverged}; {kept} (lower the learning "
                                 "rates or use --amp off)") from None
        if info.is_main:
            print(f"done: best {data.eval_split} R@1 {run.best['R1']:.2f} at epoch {run.best['epoch']} "
                  f"({output_dir / 'best.pt'})")
    distributed.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(distributed.run(main, ARGS))
