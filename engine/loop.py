"""The training loop's epoch: each step's forward and backward (whole, or by gradient caching), the guarded
optimiser step, the running losses on the progress bar, and the epoch's metrics row; and evaluation during training.
"""
from __future__ import annotations

import sys
import time

import torch
from tqdm import tqdm

from datasets.transforms import to_model_input
from engine.control import StopRequest, TrainingStopped
from engine.data import TrainData
from engine.grad_cache import forward_backward
from engine.step_guard import StepGuard
from evaluation.encode import encode_split, score_split
from models.cfine import CFine
from models.precision import autocast
from utils import distributed


def train_one_epoch(model, loader, optimizer, scaler, guard: StepGuard, stop: StopRequest, *, device, amp: str,
                    epoch: int, start_step: int, progress: bool, chunk_size: int | None = None,
                    carried: dict | None = None) -> dict:
    """One pass over the epoch's remaining batches; returns the epoch's metrics.jsonl row (epoch_row).

    chunk_size: gradient caching (engine/grad_cache.py), the same step with encoder memory for that many pairs.
    carried: the epoch_sums of the steps before start_step (a resumed mid-epoch checkpoint's): the running sums go on
    from them, so the row is the uninterrupted epoch's.

    A step whose loss or gradients are not finite is skipped before the optimiser step (the guard puts back the
    BN statistics its forward changed; TrainingDiverged after too many in a row); a stop request ends the epoch
    after the current step with TrainingStopped, which carries the epoch's sums so far (epoch_sums).
    """
    model.train()
    sums, kept, pairs, seconds_before = carried_sums(carried, device)
    step = start_step
    bar = tqdm(loader, desc=f"epoch {epoch + 1}", initial=start_step, total=start_step + len(loader),
               disable=not progress, dynamic_ncols=True)
    started = time.perf_counter() - seconds_before
    for batch in bar:
        images, flips, tokens, pids = (batch[key].to(device, non_blocking=True)
                                       for key in ("images", "flips", "tokens", "pids"))
        images = to_model_input(images, loader.dataset.mean_std, flips)  # uint8 -> flipped, normalised float
        guard.save_buffers()
        optimizer.zero_grad(set_to_none=True)
        out = forward_backward(model, images, tokens, pids, precision=lambda: autocast(device, amp), scale=scaler.scale,
                               chunk_size=chunk_size)
        loss_finite, grads_finite, stopping = guarded_update(optimizer, scaler, guard, out.loss, stop.requested)
        step, pairs = step + 1, pairs + images.shape[0]
        if loss_finite and grads_finite:
            for key, value in {"loss": out.loss, **{f"loss_{k}": v for k, v in out.losses.items()}}.items():
                sums[key] = sums.get(key, 0) + value.detach().float()
            kept += 1
        elif distributed.is_main_process():
            print(f"epoch {epoch + 1} step {step}: non-finite {'gradients' if loss_finite else 'loss'}, step skipped "
                  f"({guard.in_a_row} in a row, {guard.total} in total)", file=sys.stderr)
        if progress and (step % 10 == 0 or step == start_step + 1):
            rate = pairs * distributed.get_world_size() / max(time.perf_counter() - started, 1e-9)
            bar.set_postfix({k.removeprefix("loss_"): f"{float(v) / max(kept, 1):.3f}" for k, v in sums.items()}
                            | {"pairs/s": f"{rate:.0f}"})
        if stopping:
            raise TrainingStopped(step, epoch_sums(sums, kept, pairs, started))
    return epoch_row(epoch, _rank_means(sums, kept), pairs, optimizer, guard, started)


def epoch_sums(sums: dict[str, torch.Tensor], kept: int, pairs: int, started: float) -> dict:
    """An interrupted epoch's running sums for its checkpoint: every rank's loss sums (gathered, a collective: every
    rank stops after the same step), as float32 tensors of shape (world size,); the kept steps and this rank's pairs
    (the same on every rank), and the training seconds so far."""
    columns = {}
    if sums:  # (none before the first kept step, on every rank alike)
        every = distributed.gather_rows(torch.stack(list(sums.values()))[None]).cpu()  # (world size, keys)
        columns = {key: every[:, i].clone(memory_format=torch.contiguous_format) for i, key in enumerate(sums)}
    return {"sums": columns, "kept": kept, "pairs": pairs, "seconds": round(time.perf_counter() - started, 3)}


def carried_sums(carried: dict | None, device) -> tuple[dict[str, torch.Tensor], int, int, float]:
    """(sums, kept, pairs, seconds) to start an epoch from: zeros, or this rank's share of epoch_sums."""
    if not carried:
        return {}, 0, 0, 0.0
    rank = distributed.get_rank()
    sums = {key: every[rank].to(device) for key, every in carried["sums"].items()}
    return sums, carried["kept"], carried["pairs"], carried["seconds"]


def guarded_update(optimizer, scaler, guard: StepGuard, loss: torch.Tensor,
                   stop_requested: bool) -> tuple[bool, bool, bool]:
    """The optimiser step, or the guard's skip when the loss or a gradient is not finite; StepGuard.check's flags."""
    # fp16: the guard checks the gradients as the optimiser would use them, unscaled (a no-op without fp16).
    scaler.unscale_(optimizer)
    loss_finite, grads_finite, stopping = guard.check(loss, stop_requested)
    finite = loss_finite and grads_finite
    if finite:
        # Not scaler.step: after unscale_ it would only repeat the guard's check (the scaler's found_inf comes from
        # the same gradients), and with a non-fused optimiser read it on the host a second time.
        optimizer.step()
    # Every step: update() consumes the found_inf that unscale_ recorded (it needs no step() before it) and halves
    # the scale after an overflow, so an fp16 step skipped here lowers the scale as scaler.step's skip would.
    scaler.update()
    if not finite:
        # Under fp16 this counts the scaler's overflow steps too. Each halves the scale, so the default limit of 50
        # in a row (a scale 2^50 lower) is no calibration any more but gradients that stay non-finite.
        guard.skip()  # after update(): TrainingDiverged leaves the scaler consistent
    return loss_finite, grads_finite, stopping


def _rank_means(sums: dict[str, torch.Tensor], count: int) -> dict[str, float]:
    """Per-step means averaged over ranks: a collective (all ranks skip the same steps, so keys and counts agree)."""
    if sums:
        totals = distributed.all_reduce_sum(torch.stack(list(sums.values()))) / distributed.get_world_size()
        sums = dict(zip(sums, totals))
    return {k: float(v) / max(count, 1) for k, v in sums.items()}


def epoch_row(epoch: int, losses: dict[str, float], pairs: int, optimizer, guard: StepGuard, started: float) -> dict:
    """The metrics.jsonl row of a finished epoch, before evaluation: losses, learning rates, counts, speed."""
    seconds = time.perf_counter() - started
    return {"epoch": epoch + 1, **losses, **{f"lr_{g['name']}": g["lr"] for g in optimizer.param_groups},
            "skipped_steps": guard.total, "seconds": round(seconds, 3),
            "pairs_per_s": round(pairs * distributed.get_world_size() / max(seconds, 1e-9), 2)}


def evaluate(model: CFine, data: TrainData, settings, device, amp: str, progress: bool) -> dict:
    """The metrics.jsonl fields of the evaluation split's retrieval metrics (docs/method.md §7), sharded over the
    processes."""
    encoded = encode_split(model, data.eval_data, device, amp, settings.eval_batch_size, progress, settings.compile)
    return metrics_row(score_split(encoded), data.eval_split)


def metrics_row(results: dict, split: str) -> dict:
    """The metrics.jsonl fields of one evaluation: t2i (concatenated feature), t2i global-only, and i2t."""
    return {"eval_split": split, **results["t2i"], **{f"{k}_global": v for k, v in results["t2i_global"].items()},
            **{f"i2t_{k}": v for k, v in results["i2t"].items()}}
