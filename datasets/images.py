"""Check that every referenced image exists and fully decodes, on all cores, with a progress bar."""
from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm import tqdm

SMALL_SIDE = 16  # crops below this many pixels on a side are reported (they still load)


@dataclass
class ImageReport:
    """Outcome of checking a list of images: the bad ones with reasons, plus mode/size statistics."""

    bad: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)
    modes: Counter = field(default_factory=Counter)
    small: int = 0


def check_image(path: str) -> tuple[str, str | None, tuple[int, int] | None]:
    """Fully decode one image: (mode, None, size) if it loads, ("", reason, None) otherwise."""
    if not os.path.isfile(path):
        return "", "missing", None
    try:
        with Image.open(path) as img:
            img.load()  # decodes every byte: truncated files fail here, not at open()
            return img.mode, None, img.size
    except Exception as err:  # PIL raises many types for broken files; all mean "does not decode"
        return "", f"does not decode ({type(err).__name__}: {err})", None


def usable_cpus() -> int:
    """All cores this process may use (its CPU affinity where the OS reports one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def check_images(root: Path, relpaths: list[str], workers: int | None = None, desc: str = "images") -> ImageReport:
    """Decode every `root/relpath` in parallel (ProcessPoolExecutor, chunked) and collect failures."""
    workers = workers or usable_cpus()
    paths = [str(root / rel) for rel in relpaths]
    report = ImageReport()
    bar = tqdm(total=len(paths), desc=desc, unit="img", mininterval=0.5, dynamic_ncols=True)
    if workers <= 1 or len(paths) < 64:
        results = map(check_image, paths)
        _collect(report, relpaths, results, bar)
    else:
        chunksize = max(1, min(256, len(paths) // (workers * 8)))
        with ProcessPoolExecutor(max_workers=workers) as pool:
            _collect(report, relpaths, pool.map(check_image, paths, chunksize=chunksize), bar)
    bar.close()
    return report


def _collect(report: ImageReport, relpaths, results, bar) -> None:
    """Fold per-image results (in input order) into `report`."""
    for rel, (mode, reason, size) in zip(relpaths, results):
        if reason is not None:
            report.bad.append((rel, reason))
        else:
            report.modes[mode] += 1
            report.small += min(size) < SMALL_SIDE
        bar.update(1)
