"""The common record form and the shared reader behind the three benchmark parsers."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from utils.errors import DataError


@dataclass(frozen=True)
class Record:
    """One annotated image: split, person id, image path relative to `imgs/`, captions.

    Parsed, `captions` are the annotation's strings; cleaned (datasets/validate.py), they are data.sh's cleaned text
    and `raw_captions` the annotation's string of each, which bert mode tokenises (docs/faithfulness.md). Records are
    compared without the raw strings: two records equal once cleaned are exact duplicates.
    """

    split: str
    pid: int
    image: str
    captions: tuple[str, ...]
    raw_captions: tuple[str, ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class Benchmark:
    """How one benchmark lays out its annotation file, images and splits on disk."""

    name: str
    annotation_names: tuple[str, ...]  # accepted file names, first is canonical
    image_key: str
    splits: tuple[str, ...]
    captions_per_image: int
    writes_tokens: bool = True  # whether the raw records carry the legacy `processed_tokens`
    required_keys: tuple[str, ...] = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "required_keys", ("split", "captions", self.image_key, "id"))

    def find_annotation(self, dataset_dir: Path) -> Path:
        """Return the annotation file under `dataset_dir`, accepting each known spelling."""
        for name in self.annotation_names:
            if (dataset_dir / name).is_file():
                return dataset_dir / name
        names = " or ".join(self.annotation_names)
        raise DataError(
            f"{self.name}: no annotation file {names} in {dataset_dir}. The expected layout is "
            f"{dataset_dir}/{self.annotation_names[0]} next to {dataset_dir}/imgs/ (see the README, section Data)."
        )


@dataclass
class Parsed:
    """A benchmark read from disk: records plus what parsing had to repair."""

    benchmark: Benchmark
    annotation: Path
    image_root: Path
    records: list[Record]
    string_ids: int = 0  # ids stored as strings of digits (accepted)


def read_json_list(path: Path) -> list:
    """Load a JSON list; a syntax error names the file, line and column."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text (byte {err.start}): re-save it as UTF-8 JSON.") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}. "
            "Fix that spot (or restore the original file from the dataset's distribution)."
        ) from None
    except ValueError as err:  # not a syntax error: a number of 4300+ digits, which Python's int() refuses
        raise DataError(f"{path}: a number in it is too long to read ({str(err).split(':')[0]}); no id or other "
                        "value has that many digits: restore the original file from the dataset's distribution."
                        ) from None
    except RecursionError:
        raise DataError(
            f"{path}: nested deeper than Python's JSON reader can follow (lists or objects inside one another "
            "thousands of levels deep); a benchmark annotation is a list of flat records: restore the original "
            "file from the dataset's distribution."
        ) from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records at the top level, found {type(data).__name__}.")
    return data


ID_LIMIT = 2 ** 63  # ids become 64-bit tensors (torch.long): |id| must stay below this


def _parse_id(value) -> tuple[int, bool] | None:
    """Accept an int or a string of ASCII digits (some copies store ids as strings); None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value, False
    text = value.strip() if isinstance(value, str) else ""
    if text.isascii() and text.isdigit():  # str.isdigit alone accepts "1²" and "١", which int() refuses
        # int() refuses 4300+ digits; any id of more than 19 digits is out of range anyway (ID_LIMIT)
        return (int(text) if len(text) <= 20 else ID_LIMIT), True
    return None


def _is_text(value: str) -> bool:
    """Whether value can be written as UTF-8: JSON can spell unpaired UTF-16 surrogates (\\ud800), Python keeps them."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def normalise_image_path(value: str) -> str:
    """The form every check and every later use sees: surrounding whitespace stripped, '/' separators,
    empty and '.' components dropped."""
    parts = value.strip().replace("\\", "/").split("/")
    return "/".join(part for part in parts if part not in ("", "."))


def _image_problem(value) -> str | None:
    """Why an image entry cannot be a path inside imgs/, or None."""
    if not isinstance(value, str) or not normalise_image_path(value):
        return "is not a non-empty path string"
    if "\x00" in value:
        return f"({value!r}) holds a NUL byte, which no file name can"
    if not _is_text(value):
        return f"({value!r}) holds an unpaired surrogate escape (\\ud800-\\udfff), which no file name can"
    stripped = value.strip().replace("\\", "/")
    if stripped.startswith("/") or re.match(r"^[A-Za-z]:", stripped):
        return f"({value!r}) is an absolute path; it must be relative to imgs/"
    if ".." in normalise_image_path(value).split("/"):
        return f"({value!r}) leaves imgs/ through '..'"
    return None


def _record_problem(raw, index: int, bench: Benchmark) -> str | None:
    """Describe the first structural problem of raw record `index`, or None if it is usable."""
    if not isinstance(raw, dict):
        return f"record {index} is a {type(raw).__name__}, not an object"
    for key in bench.required_keys:
        if key not in raw:
            return f"record {index} lacks key '{key}'"
    if raw["split"] not in bench.splits:
        return f"record {index} has split {raw['split']!r}, expected one of {list(bench.splits)}"
    image_problem = _image_problem(raw[bench.image_key])
    if image_problem:
        return f"record {index} key '{bench.image_key}' {image_problem}"
    captions = raw["captions"]
    if isinstance(captions, str):
        return f"record {index} key 'captions' is a string, not a list of captions (write [\"...\"])"
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        return f"record {index} key 'captions' is not a list of strings"
    broken = next((i for i, c in enumerate(captions) if not _is_text(c)), None)
    if broken is not None:
        return (f"record {index} key 'captions' holds an unpaired surrogate escape (\\ud800-\\udfff), which is not "
                f"text, in caption {broken} ({captions[broken][:60]!r})")
    parsed = _parse_id(raw["id"])
    if parsed is None:
        return f"record {index} key 'id' is {raw['id']!r}, not an integer (a JSON number or a string of digits 0-9)"
    if abs(parsed[0]) >= ID_LIMIT:
        digits = str(raw["id"]).strip()
        shown = digits if len(digits) <= 40 else f"{digits[:20]}… ({len(digits)} digits)"
        return f"record {index} key 'id' is {shown}, outside the 64-bit range (-2**63, 2**63) ids are kept in"
    return None


def parse_benchmark(bench: Benchmark, dataset_dir: Path) -> Parsed:
    """Read `dataset_dir` in `bench`'s raw layout into common `Record`s (every problem reported at once)."""
    dataset_dir = Path(dataset_dir)
    annotation = bench.find_annotation(dataset_dir)
    image_root = dataset_dir / "imgs"
    if not image_root.is_dir():
        raise DataError(f"{bench.name}: image folder {image_root} is missing (expected next to {annotation.name}).")
    raw_records = read_json_list(annotation)
    problems = [p for i, raw in enumerate(raw_records) if (p := _record_problem(raw, i, bench))]
    if problems:
        shown = "; ".join(problems[:10])
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise DataError(
            f"{annotation}: {len(problems)} malformed record(s) (indices are 0-based positions in the list): "
            f"{shown}{more}. Each record needs keys {list(bench.required_keys)}: fix those records, or restore the "
            "file from the dataset's distribution."
        )
    records, string_ids = [], 0
    for raw in raw_records:
        pid, was_string = _parse_id(raw["id"])
        string_ids += was_string
        image = normalise_image_path(raw[bench.image_key])
        records.append(Record(raw["split"], pid, image, tuple(raw["captions"])))
    return Parsed(bench, annotation, image_root, records, string_ids)
