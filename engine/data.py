"""A training run's data: the training loader, the split that selects best.pt, and what identifies the data, so that
--resume and test.py rebuild the same splits (docs/training.md)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import torch

from datasets.build import EvalData, available_splits, build_eval_data, build_train_loader, loader_workers
from datasets.holdout import carve_validation_ids
from datasets.processed import check_same_data, data_identity, load_split
from models.tokenization import CaptionTokenizer
from utils.distributed import DistInfo
from utils.errors import DataError


@dataclass
class TrainData:
    """The training loader, the split that evaluates (and selects best.pt), and what identifies the data.

    eval_split: "val" (the dataset's), "val_carved" (training ids held out, `held_out_ids`) or "test" (--select_on
    test). The held-out ids also sit in `identity` (the checkpoint's "data" record), so --resume and test.py
    rebuild the same split.
    """

    loader: torch.utils.data.DataLoader
    eval_data: EvalData
    eval_split: str
    identity: dict
    held_out_ids: list[int] = field(default_factory=list)


def held_out_ids(checkpoint: dict) -> list[int]:
    """The training ids a checkpoint's run held out as its validation split ([] when it had a val split)."""
    return list((checkpoint.get("data") or {}).get("held_out_ids") or [])


def selection_split(settings: argparse.Namespace, processed: Path, resumed: dict | None) -> tuple[str, list[int]]:
    """(eval_split, held-out training ids): the dataset's val, else ids carved from train (from --seed, or the
    resumed run's own), or test when --select_on test."""
    if settings.select_on == "test" or (resumed or {}).get("eval_split") == "test":  # runs before --select_on did too
        return "test", []
    if "val" in available_splits(processed):
        return "val", []
    if resumed is not None:
        held_out = held_out_ids(resumed)
        if not held_out:
            raise DataError(f"--resume {settings.resume}: the run selects on a validation split carved from the "
                            "training ids, but the checkpoint does not record them (data.held_out_ids)")
        return "val_carved", held_out
    pids = [r["pid"] for r in load_split(processed, "train").records]
    return "val_carved", carve_validation_ids(pids, settings.seed)


def build_data(settings: argparse.Namespace, info: DistInfo, tokenizer: CaptionTokenizer,
               resumed: dict | None = None) -> TrainData:
    """Training pairs of --dataset (held-out ids left out) and the split that selects best.pt (selection_split)."""
    processed = Path(settings.data_root) / settings.dataset
    workers = loader_workers(settings.workers, info.local_world_size)
    try:
        eval_split, held_out = selection_split(settings, processed, resumed)
        loader = build_train_loader(processed, image_size=tuple(settings.image_size), batch_size=settings.batch_size,
                                    workers=workers, mean_std=settings.mean_std, seed=settings.seed,
                                    num_replicas=info.world_size, rank=info.rank, tokenizer=tokenizer, held_out_ids=held_out)
        eval_data = build_eval_data(processed, "test" if eval_split == "test" else "val",
                                    image_size=tuple(settings.image_size), batch_size=settings.eval_batch_size,
                                    workers=workers, mean_std=settings.mean_std, tokenizer=tokenizer,
                                    held_out_ids=held_out)
    except ValueError as error:  # a batch larger than the data
        raise DataError(f"--data_root/--dataset: {error}") from None
    identity = data_identity(processed) | ({"held_out_ids": held_out} if held_out else {})
    return TrainData(loader, eval_data, eval_split, identity, held_out)


def check_resumed_data(settings: argparse.Namespace, state: dict) -> None:
    """The data under --data_root must be the run's: same annotation and split sizes, as many training ids."""
    processed = Path(settings.data_root) / settings.dataset
    check_same_data(state.get("data"), processed, settings.resume)
    train_ids = data_identity(processed)["splits"].get("train", {}).get("ids")
    classes = state["config"]["num_classes"]
    held_out = len(held_out_ids(state))  # carved off as val: not classes
    if train_ids is None or train_ids - held_out != classes:
        held = f" ({held_out} of them held out as val)" if held_out else ""
        raise DataError(f"--data_root: {processed} has {train_ids} training identities{held}, but the run in "
                        f"{settings.resume} has a classifier over {classes}: point --data_root at the data that run "
                        "was trained on")
