"""The search index written by `search.py index`: one folder, read memory-mapped, replaced atomically.

    INDEX/manifest.json          format, image folder, checkpoint {path, sha256}, feature width, the features
                                 file's name, and [relative path, size, mtime_ns] of every indexed image
    INDEX/features-<token>.npy   (N, D) float16 retrieval features, row i = image i (NumPy's .npy format)

A rewrite writes a new features file under a new name, then replaces the manifest (the commit), then removes
the old features file: a reader sees the old pair or the new one, never a mix, and an interrupted rewrite
leaves the old index usable. Both files are written with utils/files.py's atomic_write (a temporary file
renamed over the destination, which replaces a link rather than writing through it); the next rewrite
removes what a killed one left (its temporary files, an uncommitted features file). An INDEX that is itself
a symlink is refused.
"""
from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from retrieval.image_folder import ImageFile, inside
from utils.errors import SearchIndexError
from utils.files import atomic_write, remove_stale, sha256_file

FORMAT = "cfine-search-index-v1"
MANIFEST = "manifest.json"
FEATURE = "concat"  # the paper's retrieval feature: L2-normalised [global, lg1, lg2]
REBUILD = "rebuild it with `python search.py index --checkpoint CK --images DIR --out INDEX`"


def checkpoint_identity(path: str | os.PathLike) -> dict:
    """What an index records about the model that encoded it: the checkpoint's absolute path and SHA256."""
    return {"path": os.path.abspath(path), "sha256": sha256_file(path)}


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


def read_index(location: str | os.PathLike) -> SearchIndex:
    """Load an index folder; the features are memory-mapped, not read. Errors name the folder and the fix."""
    location = Path(location)
    _refuse_link(location)
    manifest_path = location / MANIFEST
    if not manifest_path.is_file():
        what = "does not exist" if not location.exists() else f"has no {MANIFEST}, so it is not a search index"
        raise SearchIndexError(f"{location} {what}: build one with `python search.py index --checkpoint CK "
                               f"--images DIR --out {location}`")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT:
            raise ValueError(f"format is {manifest.get('format')!r}, expected {FORMAT!r}")
        images = [ImageFile(str(p), int(size), int(mtime)) for p, size, mtime in manifest["images"]]
        features_path = location / Path(manifest["features"]).name
        dim, checkpoint, image_root = int(manifest["dim"]), dict(manifest["checkpoint"]), Path(manifest["image_root"])
        features = np.load(features_path, mmap_mode="c" if images else None)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SearchIndexError(f"{location} is unreadable ({type(error).__name__}: {error}); delete it and "
                               f"{REBUILD}") from None
    if features.dtype != np.float16 or features.shape != (len(images), dim):
        raise SearchIndexError(f"{features_path} holds {features.dtype} {features.shape}, but {manifest_path} "
                               f"lists {len(images)} images of width {dim} (float16); delete {location} and {REBUILD}")
    return SearchIndex(location, image_root, checkpoint, images, features)


def open_for_update(location: str | os.PathLike, image_root: str | os.PathLike, checkpoint: dict) -> SearchIndex | None:
    """The existing index at location to update, or None if there is none; refuses one built otherwise."""
    location = Path(location)
    _refuse_link(location)
    if not location.exists() or (location.is_dir() and not any(location.iterdir())):
        return None
    if not (location / MANIFEST).is_file():
        raise SearchIndexError(f"{location} exists and is not a search index (no {MANIFEST}); it is left as it is: "
                               "pass another --out")
    index = read_index(location)
    fix = f"pass another --out for a new index, or delete {location} to rebuild it"
    if index.checkpoint.get("sha256") != checkpoint["sha256"]:
        raise SearchIndexError(f"{location} was built with another checkpoint ({index.checkpoint.get('path')}, "
                               f"sha256 {str(index.checkpoint.get('sha256'))[:12]}...), not {checkpoint['path']} "
                               f"(sha256 {checkpoint['sha256'][:12]}...); its features cannot be mixed: {fix}")
    if os.path.realpath(index.image_root) != os.path.realpath(image_root):
        raise SearchIndexError(f"{location} indexes the folder {index.image_root}, not {os.path.abspath(image_root)}: "
                               f"{fix}")
    return index


def _manifest_text(manifest: dict, images: list[ImageFile]) -> str:
    """Indented JSON with one line per image (readable, and compact for a million images)."""
    head = json.dumps({**manifest, "images": []}, indent=2, ensure_ascii=False)
    rows = ",\n".join("    " + json.dumps([i.path, i.size, i.mtime_ns], ensure_ascii=False) for i in images)
    return head[:head.rindex("[]")] + ("[\n" + rows + "\n  ]" if images else "[]") + "\n}\n"


def _write_npy(f, blocks: Iterable[np.ndarray], rows: int, dim: int) -> None:
    """A (rows, dim) little-endian float16 .npy written block by block (never the whole array in memory)."""
    np.lib.format.write_array_header_1_0(f, {"descr": "<f2", "fortran_order": False, "shape": (rows, dim)})
    written = 0
    for block in blocks:
        f.write(np.ascontiguousarray(block, dtype="<f2").tobytes())
        written += len(block)
    if written != rows:
        raise RuntimeError(f"features: {written} rows written, {rows} expected")


def write_index(location: str | os.PathLike, image_root: str | os.PathLike, checkpoint: dict,
                images: list[ImageFile], dim: int, blocks: Iterable[np.ndarray]) -> None:
    """Write an index folder atomically: the features (row blocks, in image order) first, then the manifest."""
    location = Path(location)
    _refuse_link(location)
    remove_stale(location)  # what killed rewrites left: atomic_write's temporary files
    previous = sorted(location.glob("features-*.npy")) if location.is_dir() else []  # committed or left by a kill
    features_name = f"features-{uuid.uuid4().hex[:12]}.npy"
    manifest = {"format": FORMAT, "image_root": os.path.abspath(image_root), "checkpoint": checkpoint,
                "feature": FEATURE, "dim": dim, "dtype": "float16", "count": len(images), "features": features_name}
    try:
        atomic_write(location / features_name, lambda f: _write_npy(f, blocks, len(images), dim))
        atomic_write(location / MANIFEST, lambda f: f.write(_manifest_text(manifest, images).encode("utf-8")))
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
