"""Test helper: a generated dataset with the real benchmarks' real-world mess added to a copy of it.

Benign mess (data.sh must accept and repair or report it): grayscale, palette, RGBA and CMYK images,
mixed .jpg/.png, a tiny crop, HTML entities, non-ASCII punctuation, doubled spaces, tabs and newlines
inside and trailing (in a training and a test caption), an over-long caption, string ids, an empty
caption, a record whose only captions are blank, an exact duplicate record. Fatal mess (data.sh must
stop, unless --skip_bad_images): a missing image and a truncated JPEG.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from datasets import BENCHMARKS
from datasets.synthetic.generate import generate

LONG_TAIL = " She walks slowly along the crowded street past the shops and the station" * 8


def make_dataset(root: Path, name: str, ids: int = 20, images_per_id: int = 3, seed: int = 0) -> Path:
    """A small synthetic dataset in `name`'s raw layout under root/<name>."""
    return generate(Path(root), name, ids, images_per_id, seed)


def read_annotation(dataset_dir: Path) -> tuple[Path, list[dict]]:
    """(path, records) of the annotation file of a raw dataset folder."""
    for bench in BENCHMARKS.values():
        for candidate in bench.annotation_names:
            if (dataset_dir / candidate).is_file():
                return dataset_dir / candidate, json.loads((dataset_dir / candidate).read_text())
    raise FileNotFoundError(f"no annotation file in {dataset_dir}")


def write_annotation(path: Path, records: list[dict]) -> None:
    """Write records one per line, like the generator (keeps JSON error line numbers meaningful)."""
    path.write_text("[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n]\n", encoding="utf-8")


@dataclass
class Mess:
    """Where the mess went (record indices are positions in the annotation list)."""

    dataset_dir: Path
    annotation: Path
    image_key: str
    modes: dict[str, str] = field(default_factory=dict)  # PIL mode -> image path relative to imgs/
    html_record: int = -1  # its first caption holds the entities and odd whitespace (train split)
    html_test_record: int = -1  # the same kind of mess in a test record's first caption
    long_record: int = -1
    string_id_records: list[int] = field(default_factory=list)
    empty_caption_record: int = -1
    blank_record: int = -1  # every caption blank: the record is dropped
    duplicate_of: int = -1  # the appended last record repeats this one
    tiny_image: str = ""
    missing_image: str = ""
    truncated_image: str = ""


def _resave(dataset_dir: Path, record: dict, key: str, mode: str, ext: str, size=None) -> str:
    """Re-save a record's image in PIL `mode` with extension `ext`, updating the record; return the new path."""
    old = record[key]
    new = str(Path(old).with_suffix(ext))
    with Image.open(dataset_dir / "imgs" / old) as img:
        img = img.convert("RGB")
    if size:
        img = img.resize(size)
    img = img.convert(mode) if mode != "P" else img.convert("P", palette=Image.ADAPTIVE, colors=32)
    (dataset_dir / "imgs" / old).unlink()
    img.save(dataset_dir / "imgs" / new)
    record[key] = new
    return new


def make_messy_copy(src: Path, dst: Path, *, bad_images: bool = True, annotation_name: str | None = None) -> Mess:
    """Copy dataset folder `src` to `dst` and add the mess; `bad_images` adds the fatal part."""
    shutil.copytree(src, dst)
    path, records = read_annotation(dst)
    bench = next(b for b in BENCHMARKS.values() if path.name in b.annotation_names)
    if annotation_name:
        path = path.rename(dst / annotation_name)
    key = bench.image_key
    mess = Mess(dst, path, key)
    train = [i for i, r in enumerate(records) if r["split"] == "train"]
    test = [i for i, r in enumerate(records) if r["split"] == "test"]
    for i, (mode, ext) in zip(train, [("L", ".jpg"), ("P", ".png"), ("RGBA", ".png"), ("CMYK", ".jpg")]):
        mess.modes[mode] = _resave(dst, records[i], key, mode, ext)
    mess.tiny_image = _resave(dst, records[train[4]], key, "RGB", ".png", size=(6, 12))

    mess.html_record = train[5]
    records[train[5]]["captions"][0] = ("The woman&#39;s  coat is &quot;red&quot; &amp;\t"
                                        "long\u2014really\n\u201clong\u201d.\n\n")
    mess.html_test_record = test[3]
    records[test[3]]["captions"][0] = "  A man&#39;s bag &amp;\tcoat:\n\nblack  &lt;and&gt; grey.\n"
    mess.long_record = train[6]
    records[train[6]]["captions"][0] += LONG_TAIL
    mess.empty_caption_record = train[7]
    records[train[7]]["captions"].append("  \n\t")
    mess.blank_record = train[8]
    records[train[8]]["captions"] = ["", " "]
    string_pid = records[train[-1]]["id"]
    mess.string_id_records = [i for i, r in enumerate(records) if r["id"] == string_pid]
    for i in mess.string_id_records:
        records[i]["id"] = f"{string_pid:04d}"
    mess.duplicate_of = test[0]
    records.append(json.loads(json.dumps(records[test[0]])))

    if bad_images:
        mess.missing_image = records[test[1]][key]
        (dst / "imgs" / mess.missing_image).unlink()
        mess.truncated_image = _resave(dst, records[test[2]], key, "RGB", ".jpg")
        data = (dst / "imgs" / mess.truncated_image).read_bytes()
        (dst / "imgs" / mess.truncated_image).write_bytes(data[: len(data) // 2])
    write_annotation(path, records)
    return mess
