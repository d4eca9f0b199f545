"""Read processed_data/<NAME>/ (written by data.sh) back, validating it with errors that say what to run."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from datasets.base import DataError

SPLIT_ORDER = ("train", "val", "test")
RERUN = "run `bash data.sh <dataset_root> <NAME>` to (re)create it"


@dataclass(frozen=True)
class SplitRecords:
    """One processed split: absolute image root plus records {"pid", "image", "captions"}."""

    name: str
    image_root: Path
    records: list[dict]


def load_meta(processed_dir: Path) -> dict:
    """meta.json of a processed dataset; a missing folder or file says to run data.sh first."""
    processed_dir = Path(processed_dir)
    meta_path = processed_dir / "meta.json"
    if not processed_dir.is_dir():
        raise DataError(f"processed dataset {processed_dir} does not exist: {RERUN} first "
                        "(it writes processed_data/<NAME>/ in the current folder).")
    if not meta_path.is_file():
        raise DataError(f"{meta_path} is missing, so {processed_dir} is not a finished data.sh output: {RERUN}.")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        image_root, splits = Path(meta["image_root"]), meta["splits"]
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{meta_path} is unreadable ({type(err).__name__}: {err}): {RERUN}.") from None
    if not image_root.is_dir():
        raise DataError(f"{meta_path} points at image root {image_root}, which no longer exists "
                        f"(dataset moved or deleted?): {RERUN} with the dataset's current location.")
    if not isinstance(splits, dict):
        raise DataError(f"{meta_path}: 'splits' is not an object: {RERUN}.")
    return meta


def available_splits(processed_dir: Path) -> list[str]:
    """Splits present in a processed dataset, in train/val/test order."""
    meta = load_meta(processed_dir)
    return [s for s in SPLIT_ORDER if s in meta["splits"] and (Path(processed_dir) / f"{s}_reid.json").is_file()]


def load_split(processed_dir: Path, split: str) -> SplitRecords:
    """Records of one split, each checked for {"pid": int, "image": str, "captions": [str, ...]}."""
    processed_dir = Path(processed_dir)
    meta = load_meta(processed_dir)
    path = processed_dir / f"{split}_reid.json"
    if split not in meta["splits"] or not path.is_file():
        have = available_splits(processed_dir)
        raise DataError(f"{processed_dir} has no '{split}' split (it has {have}); "
                        + ("ICFG-PEDES has no val split: evaluate on test." if split == "val" else RERUN + "."))
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise DataError(f"{path} is not valid JSON ({err}): {RERUN}.") from None
    if not isinstance(records, list) or not records:
        raise DataError(f"{path} should be a non-empty JSON list of records: {RERUN}.")
    for i, r in enumerate(records):
        ok = (isinstance(r, dict) and isinstance(r.get("pid"), int) and isinstance(r.get("image"), str)
              and isinstance(r.get("captions"), list) and r["captions"]
              and all(isinstance(c, str) and c for c in r["captions"]))
        if not ok:
            raise DataError(f"{path}: record {i} is not {{'pid': int, 'image': str, 'captions': [non-empty str, ...]}}"
                            f" (got {str(r)[:120]}): {RERUN}.")
    return SplitRecords(split, Path(meta["image_root"]), records)
