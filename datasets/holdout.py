"""A validation split carved from the training identities, for a benchmark that has none (ICFG-PEDES).

Model selection must not look at the test split, so train.py holds out about 5% of the training identities
(all their images and captions), chosen deterministically from the run's seed, trains on the rest and selects
best.pt on the held-out ones. The chosen ids are recorded in the run folder and the checkpoint.
"""
from __future__ import annotations

import dataclasses
import math
import random
from typing import Iterable

from datasets.processed import SplitRecords

HOLDOUT_FRACTION = 0.05


def carve_validation_ids(pids: Iterable[int], seed: int, fraction: float = HOLDOUT_FRACTION) -> list[int]:
    """ceil(fraction x identities) training ids, drawn with random.Random(seed) from the sorted ids; sorted.

    At least one id is held out and at least two stay for training (CMPM and CMPC need more than one class).
    """
    ids = sorted(set(pids))
    if len(ids) < 3:
        raise ValueError(f"cannot carve a validation split from {len(ids)} training identities (need at least 3)")
    count = min(len(ids) - 2, max(1, math.ceil(fraction * len(ids))))
    return sorted(random.Random(seed).sample(ids, count))


def split_off(split: SplitRecords, held_out: Iterable[int]) -> tuple[SplitRecords, SplitRecords]:
    """(training records without the held-out ids, the held-out ids' records as a 'val' split), same image root."""
    held = set(held_out)
    train = [r for r in split.records if r["pid"] not in held]
    val = [r for r in split.records if r["pid"] in held]
    return dataclasses.replace(split, records=train), dataclasses.replace(split, name="val", records=val)
