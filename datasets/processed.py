"""Read processed_data/<NAME>/ (written by data.sh) back, validating it with errors that say what to run."""
from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path

from datasets.base import ID_LIMIT, DataError

SPLIT_ORDER = ("train", "val", "test")
RERUN = "run `bash data.sh <dataset_root> <NAME>` to (re)create it"
RAW_CAPTIONS_FORMAT = 2  # the first data.sh format (meta.json's format_version) keeping the annotation's captions


@dataclass(frozen=True)
class SplitRecords:
    """One processed split: absolute image root plus records {"pid", "image", "captions"[, "raw_captions"]}.

    raw_kept: its records keep the annotation's string of every caption that cleaning changed (data.sh's format 2
    on); folder: the processed dataset it was read from (for messages).
    """

    name: str
    image_root: Path
    records: list[dict]
    raw_kept: bool = False
    folder: Path | None = None

    def caption_texts(self, raw: bool = False) -> list[str]:
        """Every caption in record order: data.sh's cleaned text, or (raw) the string the annotation file holds, which
        bert mode tokenises as the authors did (docs/faithfulness.md); raw from an older data.sh's output is refused."""
        if not raw:
            return [c for r in self.records for c in r["captions"]]
        if not self.raw_kept:
            where = self.folder or f"the '{self.name}' split"
            name = self.folder.name if self.folder else "<NAME>"
            raise DataError(f"{where} was written by an older data.sh, which kept only the cleaned captions (HTML "
                            "unescaped, whitespace collapsed), but bert mode tokenises each caption as the annotation "
                            f"file holds it: re-run `bash data.sh <dataset_root> {name}` (clip mode reads both)")
        return [c for r in self.records for c in r.get("raw_captions", r["captions"])]


def load_meta(processed_dir: Path) -> dict:
    """meta.json of a processed dataset; a missing folder or file says to run data.sh first."""
    processed_dir = Path(processed_dir)
    meta_path = processed_dir / "meta.json"
    if not processed_dir.is_dir():
        aside = sorted(processed_dir.parent.glob(f".{glob.escape(processed_dir.name)}.old-*/previous"))
        if aside:  # data.sh's two-rename fallback swap was killed between its renames (utils/files.py)
            raise DataError(f"processed dataset {processed_dir} is missing: an interrupted data.sh run left it moved "
                            f"aside as {aside[0]}; re-run `bash data.sh <dataset_root> {processed_dir.name}`, which "
                            "puts it back first.")
        raise DataError(f"processed dataset {processed_dir} does not exist: {RERUN} first "
                        "(it writes processed_data/<NAME>/ in the current folder).")
    if not meta_path.is_file():
        raise DataError(f"{meta_path} is missing, so {processed_dir} is not a finished data.sh output: {RERUN}.")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        image_root, splits = Path(meta["image_root"]), meta["splits"]
    except RecursionError:
        raise DataError(f"{meta_path} is nested deeper than a data.sh output can be (damaged): {RERUN}.") from None
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
    except RecursionError:
        raise DataError(f"{path} is nested deeper than a data.sh output can be (damaged): {RERUN}.") from None
    except ValueError as err:
        raise DataError(f"{path} is not valid JSON ({err}): {RERUN}.") from None
    if not isinstance(records, list) or not records:
        raise DataError(f"{path} should be a non-empty JSON list of records: {RERUN}.")
    for i, r in enumerate(records):
        if not _is_processed_record(r):
            raise DataError(f"{path}: record {i} is not {{'pid': 64-bit int, 'image': str, 'captions': [non-empty str, "
                            "...]}} (and, where present, 'raw_captions': as many non-empty str)"
                            f" (got {str(r)[:120]}): {RERUN}.")
    version = meta.get("format_version")
    raw_kept = type(version) is int and version >= RAW_CAPTIONS_FORMAT
    return SplitRecords(split, Path(meta["image_root"]), records, raw_kept, processed_dir)


def _is_text_list(value, length: int | None = None) -> bool:
    """A non-empty list of non-empty strings (of `length` items, when given)."""
    return (isinstance(value, list) and bool(value) and all(isinstance(c, str) and c for c in value)
            and (length is None or len(value) == length))


def _is_processed_record(r) -> bool:
    """Whether r has a split file's form: pid, image, captions and, optionally, one raw string per caption."""
    return (isinstance(r, dict) and type(r.get("pid")) is int and abs(r["pid"]) < ID_LIMIT
            and isinstance(r.get("image"), str) and "\x00" not in r["image"] and _is_text_list(r.get("captions"))
            and ("raw_captions" not in r or _is_text_list(r["raw_captions"], len(r["captions"]))))


def data_identity(processed_dir: Path) -> dict:
    """What a checkpoint records about its data: the dataset, its annotation's SHA256 and every split's sizes."""
    meta = load_meta(processed_dir)
    annotation = meta.get("annotation") if isinstance(meta.get("annotation"), dict) else {}
    return {"dataset": meta.get("dataset"), "annotation_sha256": annotation.get("sha256"), "splits": meta["splits"]}


def check_same_data(recorded: dict | None, processed_dir: Path, checkpoint: str) -> None:
    """DataError unless processed_dir holds the data `checkpoint` was trained on: the same annotation SHA256 and
    split sizes (the folder itself may have moved). Checkpoints that predate the record are not checked."""
    if not recorded:
        return
    current = data_identity(processed_dir)
    problems = []
    if current["annotation_sha256"] != recorded.get("annotation_sha256"):
        problems.append(f"its annotation's sha256 is {str(current['annotation_sha256'])[:12]}…, the run's "
                        f"{str(recorded.get('annotation_sha256'))[:12]}…")
    if current["splits"] != recorded.get("splits"):
        problems.append(f"its splits are {_sizes(current['splits'])}, the run's {_sizes(recorded.get('splits') or {})}")
    if problems:
        raise DataError(
            f"{processed_dir} is not the data {checkpoint} was trained on ({'; '.join(problems)}). Pass --data_root "
            "with the folder data.sh wrote for that run (a moved copy is fine), or train a new run on this data.")


def _sizes(splits: dict) -> str:
    """'train 320 ids / 1280 images / 2598 captions, test ...' for a message."""
    return ", ".join(f"{name} {c.get('ids')} ids / {c.get('images')} images / {c.get('captions')} captions"
                     for name, c in splits.items() if isinstance(c, dict)) or "(none)"
