"""Images/s of the training loader alone: the earlier float path vs the uint8 path, in one run.

    python benchmarks/loader_speed.py --images 512 --workers 1 --repeats 3

float path (baseline): each worker decodes, resizes (bicubic), flips and normalises, and ships float32 batches.
uint8 path (train.py's): each worker decodes and resizes to uint8 and ships uint8 batches plus flip flags;
flip and normalisation run on the training device (`to_model_input`), reported separately here on the CPU.
Synthetic JPEGs of CUHK-PEDES's typical size (about 100 x 300) are written to a temporary folder.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from datasets.build import flip_coin  # noqa: E402
from datasets.transforms import ImageTransform, ResizeToUint8, load_rgb, to_model_input  # noqa: E402


class FloatPath(Dataset):
    """The baseline: decode, resize, flip and normalise in the worker; float32 (3, H, W)."""

    def __init__(self, paths: list[str], size: tuple[int, int]):
        self.paths, self.transform = paths, ImageTransform(size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        return {"images": self.transform(load_rgb(self.paths[index]), flip_coin(0, 0, index))}


class Uint8Path(FloatPath):
    """train.py's path: decode and resize to uint8 in the worker; the flip travels as a flag."""

    def __init__(self, paths: list[str], size: tuple[int, int]):
        self.paths, self.transform = paths, ResizeToUint8(size)

    def __getitem__(self, index: int):
        return {"images": self.transform(load_rgb(self.paths[index])), "flips": torch.tensor(flip_coin(0, 0, index))}


def write_images(folder: Path, count: int) -> list[str]:
    """count JPEGs of 96-112 x 280-320 pixels with smooth random content (quality 90)."""
    rng = np.random.default_rng(0)
    paths = []
    for n in range(count):
        h, w = int(rng.integers(280, 320)), int(rng.integers(96, 112))
        base = rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(base).resize((w, h), Image.BILINEAR)
        path = folder / f"{n:05d}.jpg"
        image.save(path, quality=90)
        paths.append(str(path))
    return paths


def images_per_second(dataset: Dataset, args: argparse.Namespace, normalise: bool = False) -> float:
    """One pass over the dataset (workers started beforehand); optionally including to_model_input per batch."""
    loader = DataLoader(dataset, batch_size=args.batch, num_workers=args.workers, drop_last=True,
                        persistent_workers=args.workers > 0)
    next(iter(loader))  # start the workers outside the timing
    start, seen = time.perf_counter(), 0
    for batch in loader:
        if normalise:
            to_model_input(batch["images"], "clip", batch["flips"])
        seen += batch["images"].shape[0]
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--size", type=int, nargs=2, default=[224, 224], metavar=("H", "W"))
    parser.add_argument("--repeats", type=int, default=3, help="passes per path, interleaved; the median is reported")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="cfine-loader-") as folder:
        paths = write_images(Path(folder), args.images)
        size = tuple(args.size)
        runs: dict[str, list[float]] = {"float": [], "uint8": [], "uint8 + normalise (CPU)": []}
        for _ in range(args.repeats):  # interleaved: a shared machine's load hits both paths alike
            runs["float"].append(images_per_second(FloatPath(paths, size), args))
            runs["uint8"].append(images_per_second(Uint8Path(paths, size), args))
            runs["uint8 + normalise (CPU)"].append(images_per_second(Uint8Path(paths, size), args, normalise=True))
    medians = {name: statistics.median(values) for name, values in runs.items()}
    print(f"{args.images} JPEGs ~100x300 -> {size[0]}x{size[1]}, batch {args.batch}, {args.workers} worker(s), "
          f"median of {args.repeats}")
    for name, value in medians.items():
        print(f"{name:26s} {value:8.1f} images/s")
    bytes_float, bytes_uint8 = 4 * 3 * size[0] * size[1] * args.batch, 3 * size[0] * size[1] * args.batch
    print(f"uint8 / float loader throughput: {medians['uint8'] / medians['float']:.2f}x; "
          f"batch bytes {bytes_uint8 / 2**20:.1f} MiB vs {bytes_float / 2**20:.1f} MiB (0.25x)")


if __name__ == "__main__":
    main()
