"""The search index written by `search.py index`: one folder, read memory-mapped, replaced atomically.

    INDEX/manifest.json          format, image folder, checkpoint {path, sha256} (+ exported_from for an exported
                                 folder: retrieval/search_model.py), feature width, the features file's name and
                                 SHA256, and [relative path, size, mtime_ns] of every indexed image
    INDEX/features-<token>.npy   (N, D) float16 retrieval features, row i = image i (NumPy's .npy format)

A rewrite writes a new features file under a new name, then replaces the manifest (the commit), then removes
the old features file: a reader sees the old pair or the new one, never a mix, and an interrupted rewrite
leaves the old index usable. Both files are written with utils/files.py's atomic_write (a temporary file
renamed over the destination, which replaces a link rather than writing through it); the next rewrite
removes what a killed one left (its temporary files, an uncommitted features file). A first run killed
before its manifest leaves only such files: a folder holding nothing else is completed by the next run, and
any other folder without a manifest is refused, left as it is. An INDEX that is itself a symlink is refused.

Integrity: the features are checked to be finite while they are written, their SHA256 is computed on the way
and recorded in the manifest, and every read (query, serve, an update reusing them) checks the manifest's
fields and recomputes the SHA256 before use: one sequential read of the file, about 1 GB/s on one core (see
docs/search.md). Whatever is wrong is one SearchIndexError naming the file and saying to rebuild. File names
that are not UTF-8 are kept exactly (image_folder.json_text).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from retrieval.image_folder import ImageFile, inside, json_text
from utils.errors import SearchIndexError
from utils.files import atomic_write, remove_stale

FORMAT = "cfine-search-index-v2"
LEGACY_FORMAT = "cfine-search-index-v1"  # no features checksum: updated in place by `index`, refused by query/serve
MANIFEST = "manifest.json"
FEATURE = "concat"  # the paper's retrieval feature: L2-normalised [global, lg1, lg2]
REBUILD = "rebuild it with `python search.py index --checkpoint CK --images DIR --out INDEX`"
_FEATURES_NAME = re.compile(r"features-[0-9a-f]{12}\.npy")
# What an interrupted write leaves: a features file no manifest names yet, or atomic_write's temporary files of the
# two destinations (.<name>.<mkstemp's 8 random characters>.tmp).
_LEFTOVER = re.compile(r"features-[0-9a-f]{12}\.npy|\.(features-[0-9a-f]{12}\.npy|manifest\.json)\.[a-z0-9_]{8}\.tmp")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def weights_sha256(identity: dict) -> str:
    """The SHA256 naming the weights behind a recorded model (retrieval/search_model.py model_identity): the source
    checkpoint's for an exported folder (`exported_from`), else the checkpoint's own."""
    return identity.get("exported_from") or identity["sha256"]


def same_model(recorded: dict, identity: dict) -> bool:
    """Whether two recorded models are the same weights: one checkpoint, or it and an export of it."""
    return weights_sha256(recorded) == weights_sha256(identity)


@dataclass
class SearchIndex:
    """An index as read back: its features stay on disk (memory-mapped) until a search reads them."""

    location: Path
    image_root: Path
    checkpoint: dict
    images: list[ImageFile]
    features: np.ndarray  # (N, D) float16, memory-mapped copy-on-write (writable for torch, never written)
    _listed: set[str] = field(default_factory=set, repr=False)

    def servable_file(self, relative: str) -> Path | None:
        """The file behind an indexed relative path if it still resolves inside the image folder, else None."""
        if not self._listed:
            self._listed.update(image.path for image in self.images)
        if relative not in self._listed:
            return None
        path = Path(os.path.realpath(self.image_root / relative))
        return path if inside(path, Path(os.path.realpath(self.image_root))) and path.is_file() else None


def _refuse_link(location: Path) -> None:
    if location.is_symlink():
        raise SearchIndexError(f"{location} is a symbolic link; an index is never written or read through a link: "
                               f"pass the folder it points to ({os.path.realpath(location)}) as the index instead")


def _entries(location: Path) -> list[Path]:
    """What the folder holds ([] when it is not a folder)."""
    try:
        return list(location.iterdir()) if location.is_dir() else []
    except OSError as error:
        raise SearchIndexError(f"{location}: cannot be read ({error.strerror}); pass another folder") from None


def _is_leftover(entry: Path) -> bool:
    """Whether a file is one an interrupted `index` run leaves (a regular file named as atomic_write names them)."""
    return bool(_LEFTOVER.fullmatch(entry.name)) and not entry.is_symlink() and entry.is_file()


def _brief(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Damaged(ValueError):
    """A manifest field of the wrong type or form, or counts that disagree."""


def _require(condition, problem: str) -> None:
    if not condition:
        raise _Damaged(problem)


def _checked_manifest(manifest) -> tuple[dict, list[ImageFile]]:
    """The manifest and its images, every field checked (type, form, counts); _Damaged says what is wrong."""
    _require(isinstance(manifest, dict), f"it holds a JSON {type(manifest).__name__}, not an object")
    _require(manifest.get("format") in (FORMAT, LEGACY_FORMAT),
             f"format is {_brief(manifest.get('format'))}, expected {FORMAT!r}")
    get = manifest.get
    _require(isinstance(get("image_root"), str), f"image_root is {_brief(get('image_root'))}, not a folder")
    checkpoint = get("checkpoint")
    _require(isinstance(checkpoint, dict) and isinstance(checkpoint.get("path"), str)
             and isinstance(checkpoint.get("sha256"), str) and _SHA256.fullmatch(checkpoint["sha256"])
             and (checkpoint.get("exported_from") is None
                  or isinstance(checkpoint["exported_from"], str) and _SHA256.fullmatch(checkpoint["exported_from"])),
             f"checkpoint is {_brief(checkpoint)}, not {{path, sha256}}")
    _require(_whole(get("dim")) and get("dim") >= 1, f"dim is {_brief(get('dim'))}, not a feature width")
    _require(isinstance(get("features"), str) and _FEATURES_NAME.fullmatch(get("features")),
             f"features is {_brief(get('features'))}, not a features-<12 hex digits>.npy name")
    if get("format") == FORMAT:
        _require(isinstance(get("features_sha256"), str) and _SHA256.fullmatch(get("features_sha256")),
                 f"features_sha256 is {_brief(get('features_sha256'))}, not a SHA256")
    rows = get("images")
    _require(isinstance(rows, list), f"images is {_brief(rows)}, not a list")
    images = []
    for i, row in enumerate(rows):  # a million rows: exact type tests (json gives int, never bool, for 3), no calls
        if not (type(row) is list and len(row) == 3 and type(row[0]) is str and type(row[1]) is int and row[1] >= 0
                and type(row[2]) is int):
            raise _Damaged(f"images[{i}] is {_brief(row)}, not [relative path, size, mtime_ns]")
        if not row[0].isascii():
            try:
                os.fsencode(row[0])
            except UnicodeEncodeError:
                raise _Damaged(f"images[{i}]'s path {_brief(row[0])} cannot be a file name") from None
        if not row[0] or row[0][0] == "/" or "\0" in row[0] or ".." in row[0] and ".." in row[0].split("/"):
            raise _Damaged(f"images[{i}]'s path {_brief(row[0])} is not a path inside the image folder")
        images.append(ImageFile(*row))
    paths = {image.path for image in images}
    _require(len(paths) == len(images), "an image path is listed twice")
    _require(_whole(get("count")) and get("count") == len(images),
             f"count is {_brief(get('count'))}, but {len(images)} images are listed")
    return manifest, images


def _open_features(path: Path) -> tuple[np.ndarray, str]:
    """The .npy at path memory-mapped copy-on-write (read, when it holds no rows) and the file's SHA256, both from one
    open file: a rewrite renaming another file over the name meanwhile cannot give the digest of one file and the
    values of another. ValueError when the header or the size is not that of a C-order array."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        buffer = bytearray(1 << 20)
        while read := f.readinto(buffer):
            digest.update(memoryview(buffer)[:read])
        f.seek(0)
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"{path.name}: .npy format version {version} is not written by search.py")
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(f)
        if fortran_order or len(shape) != 2:
            raise ValueError(f"{path.name}: not a C-order matrix (shape {shape}, fortran_order {fortran_order})")
        if shape[0] == 0:
            if f.read():
                raise ValueError(f"{path.name}: data after an empty array")
            return np.empty(shape, dtype), digest.hexdigest()
        return np.memmap(f, dtype=dtype, mode="c", offset=f.tell(), shape=shape), digest.hexdigest()


_FP16_EXPONENT = 0x7C00  # a float16 whose five exponent bits are all set is an infinity or a NaN


def _first_non_finite_row(features: np.ndarray, block: int = 4096) -> int | None:
    """The first row of a float16 matrix holding a NaN or an infinity, or None: the raw bits' exponents tested in
    blocks of rows (bounded memory; about 3 GB/s on one core, 4x faster than np.isfinite on float16)."""
    bits = features.view(np.uint16)
    for start in range(0, len(bits), block):
        exponents = bits[start:start + block] & _FP16_EXPONENT
        if exponents.max(initial=0) == _FP16_EXPONENT:
            return start + int(np.argmax((exponents == _FP16_EXPONENT).any(axis=1)))
    return None


def read_index(location: str | os.PathLike, legacy: bool = False) -> SearchIndex:
    """Load and verify an index folder; the features are memory-mapped (after their SHA256 is checked), not read.

    legacy: also accept an index of the previous format, which has no checksum (for `index`, which rewrites it).
    Errors name the folder (or file) and the fix.
    """
    location = Path(location)
    _refuse_link(location)
    manifest_path = location / MANIFEST
    if not manifest_path.is_file():
        entries = _entries(location)
        if entries and all(map(_is_leftover, entries)):
            raise SearchIndexError(f"{location} holds only what an interrupted `search.py index` left (no {MANIFEST}): "
                                   "run it again with the same --out to complete the index")
        what = "does not exist" if not location.exists() else f"has no {MANIFEST}, so it is not a search index"
        raise SearchIndexError(f"{location} {what}: build one with `python search.py index --checkpoint CK "
                               f"--images DIR --out {location}`")
    try:
        manifest, images = _checked_manifest(json.loads(manifest_path.read_text(encoding="utf-8")))
        features_path = location / manifest["features"]
        features, digest = _open_features(features_path)
    except _Damaged as error:
        raise SearchIndexError(f"{location} is damaged ({MANIFEST}: {error}); delete it and {REBUILD}") from None
    except (OSError, ValueError, KeyError, TypeError, EOFError, RecursionError) as error:
        detail = " ".join(str(error).split())[:300]  # one line
        raise SearchIndexError(f"{location} is unreadable ({type(error).__name__}: {detail}); delete it and "
                               f"{REBUILD}") from None
    dim = manifest["dim"]
    if features.dtype != np.float16 or features.shape != (len(images), dim):
        raise SearchIndexError(f"{features_path} holds {features.dtype} {features.shape}, but {manifest_path} "
                               f"lists {len(images)} images of width {dim} (float16); delete {location} and {REBUILD}")
    if manifest["format"] == LEGACY_FORMAT and not legacy:
        raise SearchIndexError(f"{location} was written by an older search.py and has no checksum of its features: "
                               f"run `python search.py index --checkpoint CK --images DIR --out {location}` once, with "
                               "the checkpoint and folder it was built with, to add one (nothing is encoded again)")
    if manifest["format"] == FORMAT and digest != manifest["features_sha256"]:
        raise SearchIndexError(f"{features_path} does not match the SHA256 recorded in {manifest_path} (it was changed "
                               f"or damaged after it was written): delete {location} and {REBUILD}")
    bad_row = _first_non_finite_row(features)
    if bad_row is not None:  # never written so (write_index refuses them): edited, checksum included
        raise SearchIndexError(f"{features_path}: row {bad_row} ({images[bad_row].path}) holds NaN or infinite values, "
                               f"which `index` never writes: delete {location} and {REBUILD}")
    return SearchIndex(location, Path(manifest["image_root"]), dict(manifest["checkpoint"]), images, features)


def open_for_update(location: str | os.PathLike, image_root: str | os.PathLike, checkpoint: dict) -> SearchIndex | None:
    """The existing index at location to update, or None if there is none (nothing there, an empty folder, or only
    what an interrupted first run left); refuses one built otherwise, and any other folder."""
    location = Path(location)
    _refuse_link(location)
    if not location.exists() or (location.is_dir() and all(map(_is_leftover, _entries(location)))):
        return None
    if not (location / MANIFEST).is_file():
        raise SearchIndexError(f"{location} exists and is not a search index (no {MANIFEST}); it is left as it is: "
                               "pass another --out")
    index = read_index(location, legacy=True)
    fix = f"pass another --out for a new index, or delete {location} to rebuild it"
    if not same_model(index.checkpoint, checkpoint):
        raise SearchIndexError(f"{location} was built with another checkpoint ({index.checkpoint.get('path')}, "
                               f"sha256 {str(index.checkpoint.get('sha256'))[:12]}...), not {checkpoint['path']} "
                               f"(sha256 {checkpoint['sha256'][:12]}...); its features cannot be mixed: {fix}")
    if os.path.realpath(index.image_root) != os.path.realpath(image_root):
        raise SearchIndexError(f"{location} indexes the folder {index.image_root}, not {os.path.abspath(image_root)}: "
                               f"{fix}")
    return index


def _manifest_text(manifest: dict, images: list[ImageFile]) -> str:
    """Indented JSON with one line per image (readable, and compact for a million images); UTF-8 encodable."""
    head = json_text({**manifest, "images": []}, indent=2)
    rows = ",\n".join("    " + json_text([i.path, i.size, i.mtime_ns]) for i in images)
    return head[:head.rindex("[]")] + ("[\n" + rows + "\n  ]" if images else "[]") + "\n}\n"


class NonFiniteFeatures(ValueError):
    """Features holding NaN or inf: never written to an index."""


def _write_npy(f, blocks: Iterable[np.ndarray], rows: int, dim: int) -> str:
    """A (rows, dim) little-endian float16 .npy written block by block (never the whole array in memory); checks
    that every value is finite and returns the file's SHA256."""
    digest = hashlib.sha256()

    class Hashing:  # what write_array_header_1_0 writes to
        def write(self, data: bytes) -> int:
            digest.update(data)
            return f.write(data)

    out = Hashing()
    np.lib.format.write_array_header_1_0(out, {"descr": "<f2", "fortran_order": False, "shape": (rows, dim)})
    written = 0
    for block in blocks:
        block = np.ascontiguousarray(block, dtype="<f2")
        if not np.isfinite(block).all():
            raise NonFiniteFeatures(f"rows {written}-{written + len(block) - 1} hold NaN or inf")
        out.write(memoryview(block.reshape(-1).view(np.uint8)))
        written += len(block)
    if written != rows:
        raise RuntimeError(f"features: {written} rows written, {rows} expected")
    return digest.hexdigest()


def write_index(location: str | os.PathLike, image_root: str | os.PathLike, checkpoint: dict,
                images: list[ImageFile], dim: int, blocks: Iterable[np.ndarray]) -> None:
    """Write an index folder atomically: the features (row blocks, in image order) first, then the manifest."""
    location = Path(location)
    _refuse_link(location)
    remove_stale(location)  # what killed rewrites left: atomic_write's temporary files
    # Features files committed or left by a kill; removed once the new manifest is in place.
    previous = [p for p in location.iterdir() if _FEATURES_NAME.fullmatch(p.name)] if location.is_dir() else []
    features_name = f"features-{uuid.uuid4().hex[:12]}.npy"
    digest = []
    try:
        atomic_write(location / features_name, lambda f: digest.append(_write_npy(f, blocks, len(images), dim)))
        manifest = {"format": FORMAT, "image_root": os.path.abspath(image_root), "checkpoint": checkpoint,
                    "feature": FEATURE, "dim": dim, "dtype": "float16", "count": len(images), "features": features_name,
                    "features_sha256": digest[0]}
        atomic_write(location / MANIFEST, lambda f: f.write(_manifest_text(manifest, images).encode("utf-8")))
    except NonFiniteFeatures as error:
        raise SearchIndexError(f"{location}: the features to write are non-finite ({error}), so nothing was written "
                               f"and the index there, if any, is unchanged; if they come from that index, delete it "
                               f"and {REBUILD}") from None
    except OSError as error:
        (location / features_name).unlink(missing_ok=True)  # written, but the manifest naming it was not
        raise SearchIndexError(f"{location}: could not be written ({error}); the previous index there, if any, "
                               "is unchanged. Free disk space or pass another --out") from error
    for old in previous:
        old.unlink(missing_ok=True)


def gather_rows(parts: list[np.ndarray], part_of_row: np.ndarray, row_in_part: np.ndarray,
                block: int = 1 << 16) -> Iterable[np.ndarray]:
    """Blocks of output rows, row i = parts[part_of_row[i]][row_in_part[i]] (old index rows and new ones)."""
    for start in range(0, len(part_of_row), block):
        which, rows = part_of_row[start:start + block], row_in_part[start:start + block]
        out = np.empty((len(which), parts[0].shape[1]), dtype=np.float16)
        for p, part in enumerate(parts):
            mask = which == p
            if mask.any():
                out[mask] = part[rows[mask]]
        yield out
