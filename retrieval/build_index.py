"""`search.py index`: encode what is new or changed under an image folder, reuse the rest, write the index.

An image is reused when its relative path, size and mtime equal the index's record of it; the rest are encoded
with the checkpoint's model as test.py encodes a gallery (uint8 resize, normalised on the device, the
concatenated retrieval feature stored as fp16), or with an exported ONNX folder's image encoder in onnxruntime
(retrieval/search_model.py: the same features within fp32 rounding). Unreadable images, and images the model
gives non-finite features (NaN or inf: an fp16 overflow, a broken checkpoint), are skipped and listed, not fatal;
the next run tries them again. File names that are not UTF-8 are indexed like any other (image_folder.py).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from datasets.build import default_workers
from datasets.transforms import ResizeToUint8
from retrieval.image_folder import ImageFiles, collate_readable, scan_image_folder, shown_name
from retrieval.index import gather_rows, open_for_update, write_index
from retrieval.search_model import SearchModel, load_search_model
from utils.errors import SettingError

SHOWN = 10  # unreadable images and links listed by name in the summary; the rest are counted
NON_FINITE = "the model gave non-finite features (NaN or inf)"


@torch.no_grad()
def encode_files(model: SearchModel, paths: list[Path], batch_size: int, workers: int, progress: bool,
                 pin_memory: bool = False) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]:
    """Retrieval features (M, width) fp16 of the readable images with finite features, their positions in paths, and
    (position, why) of the rest."""
    transform = ResizeToUint8(model.image_size)  # as test.py: uint8, normalised by the model's encoders
    loader = DataLoader(ImageFiles([str(p) for p in paths], transform), batch_size=batch_size, shuffle=False,
                        num_workers=workers, collate_fn=collate_readable, pin_memory=pin_memory)
    features, positions, failed = [np.empty((0, model.feature_width), np.float16)], [np.empty(0, np.int64)], []
    with tqdm(total=len(paths), desc="encode images", unit="img", disable=not progress) as bar:
        for batch in loader:
            failed += batch["failed"]
            if len(batch["positions"]):
                batch_features = model.encode_pixels(batch["images"]).half().cpu()
                finite = torch.isfinite(batch_features).all(dim=1)
                failed += [(p, NON_FINITE) for p in batch["positions"][~finite].tolist()]
                features.append(batch_features[finite].numpy())
                positions.append(batch["positions"][finite].numpy())
            bar.update(len(batch["positions"]) + len(batch["failed"]))
    return np.concatenate(features), np.concatenate(positions), failed


@dataclass
class IndexUpdate:
    """What one `index` run did: counts, and the files it skipped or left out (relative paths, with reasons)."""

    location: Path
    image_root: Path
    indexed: int
    encoded: int
    reused: int
    removed: int
    unreadable: list[str]
    left_out: list[str]
    non_finite: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """The lines `search.py index` prints: the counts, then the skipped files (the first SHOWN of each kind).
        Printable whatever the file names (shown_name: bytes that are not UTF-8 as \\xNN)."""
        lines = [f"{self.location}: {self.indexed} images of {self.image_root} (encoded {self.encoded} new or changed, "
                 f"reused {self.reused}, removed {self.removed} no longer there)"]
        for what, names in (("unreadable image(s) skipped (a fixed file is encoded on the next run)", self.unreadable),
                            ("image(s) the model gave non-finite features (NaN or inf) skipped (tried again on the next "
                             "run; with --amp fp16, try --amp bf16 or off)", self.non_finite),
                            (f"link(s) left out (they lead outside {self.image_root} or nowhere)", self.left_out)):
            if names:
                lines.append(f"{len(names)} {what}:\n  " + "\n  ".join(names[:SHOWN])
                             + (f"\n  ... and {len(names) - SHOWN} more" if len(names) > SHOWN else ""))
        return shown_name("\n".join(lines))


def update_index(checkpoint: str | os.PathLike, image_root: str | os.PathLike, location: str | os.PathLike,
                 device: torch.device, amp: str = "auto", batch_size: int = 128, workers: int | None = None,
                 progress: bool = True) -> IndexUpdate:
    """Create or update the index at location for the images under image_root, encoding only what changed."""
    root, location = Path(image_root), Path(location)
    if not root.is_dir():
        raise SettingError(f"--images {root}: no such folder")
    model = load_search_model(checkpoint, device, amp)
    old = open_for_update(location, root, model.identity)  # before the scan: a wrong --out fails at once
    images, left_out = scan_image_folder(root)
    if not images and old is None:
        raise SettingError(f"--images {root}: no .jpg/.jpeg/.png/.bmp/.webp files under it")
    old_row = {image: row for row, image in enumerate(old.images)} if old else {}
    todo = [image for image in images if image not in old_row]
    features, positions, failed = encode_files(
        model, [root / image.path for image in todo], batch_size, default_workers() if workers is None else workers,
        progress, pin_memory=device.type == "cuda")
    new_row = {todo[p].path: row for row, p in enumerate(positions.tolist())}
    kept = [image for image in images if image in old_row or image.path in new_row]
    # Each kept image's row: part 0 is the old index's features (memory-mapped), part 1 the newly encoded ones.
    part = np.array([0 if image in old_row else 1 for image in kept], dtype=np.int64)
    row = np.array([old_row[image] if image in old_row else new_row[image.path] for image in kept], dtype=np.int64)
    parts = [old.features if old else np.empty((0, features.shape[1]), np.float16), features]
    write_index(location, root, model.identity, kept, features.shape[1], gather_rows(parts, part, row))
    return IndexUpdate(location, root, indexed=len(kept), encoded=len(new_row), reused=int((part == 0).sum()),
                       removed=len({image.path for image in old_row} - {image.path for image in images}),
                       unreadable=[f"{todo[p].path}: {why}" for p, why in failed if why != NON_FINITE],
                       left_out=left_out, non_finite=[todo[p].path for p, why in failed if why == NON_FINITE])
