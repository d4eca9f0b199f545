"""Loaders over processed_data/<NAME>: training (image, caption, pid) pairs; evaluation gallery and queries.

Captions are tokenised once, when a dataset is built: data.sh's cleaned text, or the annotation's own strings for a
tokeniser that asks for them (bert mode's, `raw_captions`). Training randomness is reproducible by design:
the shuffle order is a function of (seed, epoch) (`EpochSampler`) and the horizontal flip of sample i is
a function of (seed, epoch, i); the sampler passes the epoch along with each index, so worker count and
worker restarts never change a batch. Call `loader.sampler.set_epoch(epoch)` before each epoch
(`set_epoch(epoch, start_batch=k)` resumes an epoch after k finished batches).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from datasets.holdout import split_off
from datasets.images import usable_cpus
from datasets.processed import SplitRecords, available_splits, load_split
from datasets.sampler import EpochSampler
from datasets.transforms import ResizeToUint8, check_mean_std, load_rgb
from models.tokenization import CaptionTokenizer, clip_token_ids, reads_raw_captions

__all__ = ["EvalData", "available_splits", "build_eval_data", "build_train_loader"]


def default_workers(processes: int = 1) -> int:
    """Loader processes per training process: its share of the node's cores minus one for the process itself."""
    return max(0, usable_cpus() // processes - 1)


def loader_workers(requested: int | None, processes: int = 1) -> int | None:
    """--workers as given; by default (None) with several training processes on the node, its cores shared among them."""
    if requested is not None or processes == 1:
        return requested  # None: the loaders' own default (the node's cores minus one)
    return default_workers(processes=processes)


def flip_coin(seed: int, epoch: int, index: int) -> bool:
    """Horizontal flip of training sample `index` in `epoch`: a pure function (hash) of its arguments."""
    return hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=1).digest()[0] & 1 == 1


class TrainPairs(Dataset):
    """One item per (image, caption) pair; pids re-numbered 0..C-1 in sorted order of the original ids.

    Items hold the resized uint8 image and its flip decision; `to_model_input` flips and normalises on the device.
    """

    def __init__(self, split: SplitRecords, transform: ResizeToUint8, seed: int = 42,
                 tokenizer: CaptionTokenizer = clip_token_ids, mean_std: str = "clip"):
        records = split.records
        self.image_paths = [str(split.image_root / r["image"]) for r in records]
        original = sorted({r["pid"] for r in records})
        self.pid_map = {pid: label for label, pid in enumerate(original)}
        self.num_classes = len(original)
        image_of_pair = [i for i, r in enumerate(records) for _ in r["captions"]]
        self.pair_image = torch.tensor(image_of_pair, dtype=torch.long)
        self.pids = torch.tensor([self.pid_map[records[i]["pid"]] for i in image_of_pair], dtype=torch.long)
        self.tokens = tokenizer(split.caption_texts(raw=reads_raw_captions(tokenizer)))
        self.transform, self.seed, self.epoch = transform, seed, 0
        self.mean_std = check_mean_std(mean_std)  # for to_model_input on the device

    def set_epoch(self, epoch: int) -> None:
        """Epoch used for plain integer indices (the sampler passes (epoch, index) pairs instead)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pids)

    def __getitem__(self, index):
        epoch, index = index if isinstance(index, tuple) else (self.epoch, index)
        image = load_rgb(self.image_paths[self.pair_image[index]])
        flip = torch.tensor(flip_coin(self.seed, epoch, index))
        return {"images": self.transform(image), "flips": flip, "tokens": self.tokens[index], "pids": self.pids[index]}


class GalleryImages(Dataset):
    """Each image of a split once, in file order, as resized uint8, with its original pid and its position."""

    def __init__(self, paths: list[str], pids: torch.Tensor, transform: ResizeToUint8):
        self.paths, self.pids, self.transform = paths, pids, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        return {"images": self.transform(load_rgb(self.paths[index])), "pids": self.pids[index], "index": index}


@dataclass
class EvalData:
    """Evaluation inputs of one split: gallery images (loader) and every caption as a query (tokens)."""

    split: str
    mean_std: str  # the normalisation to_model_input applies to the gallery's uint8 batches
    gallery_loader: DataLoader
    gallery_pids: torch.Tensor  # (G,) long, original ids
    gallery_paths: list[str]  # absolute, for visualisation
    query_tokens: torch.Tensor  # (Q, L) long: 77 CLIP ids, or 100 BERT ids
    query_pids: torch.Tensor  # (Q,) long
    query_captions: list[str]  # data.sh's cleaned text (what ranking pages show), whatever the tokeniser read
    # This process's share of the gallery under torchrun (evaluation.encode), made once so its workers persist.
    gallery_shard: DataLoader | None = field(default=None, repr=False)


def _loader_kwargs(workers: int | None, pin_memory: bool | None, persistent: bool) -> dict:
    """Worker count and pinning defaults; workers stay alive between epochs (training) and evaluations."""
    workers = default_workers() if workers is None else workers
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    return {"num_workers": workers, "pin_memory": pin, "persistent_workers": persistent and workers > 0}


def build_train_loader(processed_dir: Path, *, image_size: tuple[int, int] = (224, 224), batch_size: int = 32,
                       workers: int | None = None, mean_std: str = "clip", seed: int = 42, num_replicas: int = 1,
                       rank: int = 0, pin_memory: bool | None = None,
                       tokenizer: CaptionTokenizer = clip_token_ids, held_out_ids: Sequence[int] = ()) -> DataLoader:
    """Shuffled training batches {"images" uint8, "flips", "tokens", "pids"}; `loader.dataset.num_classes` = C.

    Model inputs are `datasets.transforms.to_model_input(images, mean_std, flips)`, on the training device.

    held_out_ids: training identities carved off as the validation split (datasets/holdout.py), left out here.
    """
    split = load_split(processed_dir, "train")
    if held_out_ids:
        split, _ = split_off(split, held_out_ids)
    dataset = TrainPairs(split, ResizeToUint8(image_size), seed, tokenizer, mean_std)
    sampler = EpochSampler(len(dataset), batch_size, seed=seed, num_replicas=num_replicas, rank=rank)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                      **_loader_kwargs(workers, pin_memory, persistent=True))


def build_eval_data(processed_dir: Path, split: str, *, image_size: tuple[int, int] = (224, 224),
                    batch_size: int = 64, workers: int | None = None, mean_std: str = "clip",
                    pin_memory: bool | None = None, tokenizer: CaptionTokenizer = clip_token_ids,
                    held_out_ids: Sequence[int] = ()) -> EvalData:
    """Gallery (each image once, no shuffle, no drop) and queries (every caption, tokenised once) of `split`.

    With held_out_ids, split 'val' is carved from the training split: those identities' records.
    """
    if held_out_ids:
        if split != "val":
            raise ValueError(f"held-out training ids make a 'val' split, not {split!r}")
        _, data = split_off(load_split(processed_dir, "train"), held_out_ids)
    else:
        data = load_split(processed_dir, split)
    records = data.records
    paths = [str(data.image_root / r["image"]) for r in records]
    gallery_pids = torch.tensor([r["pid"] for r in records], dtype=torch.long)
    captions = data.caption_texts()  # shown on ranking pages; the tokeniser reads its own choice of text
    tokens = tokenizer(data.caption_texts(raw=reads_raw_captions(tokenizer)))
    query_pids = torch.tensor([r["pid"] for r in records for _ in r["captions"]], dtype=torch.long)
    gallery = GalleryImages(paths, gallery_pids, ResizeToUint8(image_size))
    loader = DataLoader(gallery, batch_size=batch_size, shuffle=False, drop_last=False,
                        **_loader_kwargs(workers, pin_memory, persistent=True))
    return EvalData(split, check_mean_std(mean_std), loader, gallery_pids, paths, tokens, query_pids, captions)
