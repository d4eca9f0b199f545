r"""A user's folder of photos: find the images under it, and load them for encoding without failing on bad ones.

File names are bytes on Linux and need not be UTF-8 (b"caf\xe9.jpg" from an old Latin-1 system). Python spells such
a name with its surrogateescape code points ("caf\udce9.jpg"), which every os and open call turns back into the
same bytes, so such an image is indexed, ranked and served like any other. Where a name becomes text for people or
other programs, it is written so that nothing fails to encode: `shown_name` for tables and pages (the bytes that
are not UTF-8 as \xNN), `json_text` for JSON (those code points as \udcNN escapes, which Python's json.loads reads
back and os.fsencode turns into the bytes).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from datasets.transforms import ImageDecodeError, ResizeToUint8, load_rgb

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass(frozen=True)
class ImageFile:
    """One image under a folder: its path relative to the folder (POSIX form) and what says it changed."""

    path: str
    size: int
    mtime_ns: int


_SURROGATE = re.compile("[\ud800-\udfff]")


def shown_name(name: str | os.PathLike) -> str:
    """A file name as printable text: bytes that are not UTF-8 written as \\xNN (\\udcNN for a code point no file
    name has); every other name unchanged."""
    text = os.fspath(name)
    if not _SURROGATE.search(text):
        return text
    try:
        return os.fsencode(text).decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that no file system name decodes to
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def json_text(value, **options) -> str:
    """json.dumps(value, ensure_ascii=False, **options), but with lone surrogates (file names that are not UTF-8)
    written as \\uXXXX escapes, so the text encodes as UTF-8 and json.loads gives the same strings back."""
    text = json.dumps(value, ensure_ascii=False, **options)
    # A lone surrogate can only stand inside a JSON string, where its \\u escape means the same character.
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def inside(path: Path, root: Path) -> bool:
    """Whether path, with every symlink resolved, lies in the folder root (root itself resolved by the caller)."""
    return Path(os.path.realpath(path)).is_relative_to(root)


def scan_image_folder(root: str | os.PathLike) -> tuple[list[ImageFile], list[str]]:
    """Images under root (recursively, by suffix, case-insensitive), sorted by path; and the links left out.

    Symlinked folders are not followed; a symlinked file is indexed only when it resolves inside root (a
    link leading out of the folder is listed as left out), so everything indexed can be served from root.
    """
    root = Path(root)
    real_root = Path(os.path.realpath(root))
    images, left_out = [], []
    for folder, subfolders, names in os.walk(root):
        subfolders.sort()
        for name in names:
            if not name.lower().endswith(IMAGE_SUFFIXES):
                continue
            path = Path(folder) / name
            relative = path.relative_to(root).as_posix()
            if not inside(path, real_root):
                left_out.append(relative)
                continue
            try:
                stat = path.stat()
            except OSError:  # a dangling link, or removed while walking
                left_out.append(relative)
                continue
            images.append(ImageFile(relative, stat.st_size, stat.st_mtime_ns))
    return sorted(images, key=lambda image: image.path), sorted(left_out)


class ImageFiles(Dataset):
    """Resized uint8 images by position; an unreadable file gives its error message instead of a tensor."""

    def __init__(self, paths: list[str], transform: ResizeToUint8):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | str]:
        try:
            return index, self.transform(load_rgb(self.paths[index]))
        except ImageDecodeError as error:  # its message advises data.sh; here the cause is what helps
            cause = error.__cause__ or error
            return index, f"{type(cause).__name__}: {cause}"


def collate_readable(items: list[tuple[int, torch.Tensor | str]]) -> dict:
    """Batch of the readable images {"images", "positions"} plus the unreadable ones {"failed": [(position, why)]}."""
    good = [(i, x) for i, x in items if isinstance(x, torch.Tensor)]
    images = torch.stack([x for _, x in good]) if good else torch.empty(0)
    return {"images": images, "positions": torch.tensor([i for i, _ in good], dtype=torch.long),
            "failed": [(i, x) for i, x in items if isinstance(x, str)]}
