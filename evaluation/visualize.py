"""Pictures of results: ranked galleries for text queries (Pillow; training curves are evaluation/curves.py)."""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from evaluation.metrics import top_ranked
from models.cfine import retrieval_features
from utils.files import atomic_write

GREEN, RED, GREY, BLACK, WHITE = (40, 170, 60), (210, 40, 40), (150, 150, 150), (20, 20, 20), (255, 255, 255)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def save_picture(image: Image.Image, out_path: str | Path) -> None:
    """Save as the file extension says (PNG, JPEG, ...), atomically: never through a link planted at out_path."""
    kind = Image.registered_extensions().get(Path(out_path).suffix.lower(), "PNG")
    atomic_write(out_path, lambda f: image.save(f, format=kind))


def ranking_page(caption: str, image_paths: Sequence[str], is_match: Sequence[bool] | None, out_path: str | Path,
                 tile: tuple[int, int] = (96, 192), title: str = "", labels: Sequence[str] | None = None) -> None:
    """One PNG: the query caption, then its ranked gallery images, true matches framed green, others red.

    is_match None (no ground truth, as for search.py) frames every image grey; labels replace the rank
    numbers under the tiles.
    """
    width, height = tile
    border, gap = 5, 8
    lines = textwrap.wrap(caption, width=max(40, (len(image_paths) * (width + gap)) // 7)) or [""]
    if title:
        lines = [title] + lines
    font = _font(14)
    text_height = 18 * len(lines) + 10
    page = Image.new("RGB", (gap + len(image_paths) * (width + gap), text_height + height + 2 * gap + 18), WHITE)
    draw = ImageDraw.Draw(page)
    for i, line in enumerate(lines):
        draw.text((gap, 5 + 18 * i), line, fill=BLACK, font=font)
    frames = [GREY] * len(image_paths) if is_match is None else [GREEN if m else RED for m in is_match]
    labels = [str(rank + 1) for rank in range(len(image_paths))] if labels is None else labels
    for rank, (path, frame, label) in enumerate(zip(image_paths, frames, labels)):
        x, y = gap + rank * (width + gap), text_height + gap
        with Image.open(path) as image:
            picture = image.convert("RGB").resize((width - 2 * border, height - 2 * border), Image.BICUBIC)
        draw.rectangle([x, y, x + width - 1, y + height - 1], fill=frame)
        page.paste(picture, (x + border, y + border))
        label_width = draw.textlength(label, font=_font(12))
        draw.text((x + (width - label_width) // 2, y + height + 2), label, fill=BLACK, font=_font(12))
    save_picture(page, out_path)


def query_pages(encoded, data, out_dir: Path, count: int, top: int = 10) -> list[Path]:
    """Pages for `count` queries spread evenly over an encoded split (evaluation/encode.py): caption, top-`top`
    gallery in the metrics' ranking order, matches in green."""
    queries = retrieval_features(encoded.queries, "concat")
    gallery = retrieval_features(encoded.gallery, "concat")
    picks = torch.linspace(0, len(queries) - 1, steps=min(count, len(queries))).round().long().unique()
    pages = []
    for rank, q in enumerate(picks.tolist()):
        order = top_ranked((gallery @ queries[q])[None], top)[0]
        matches = (encoded.gallery_pids[order] == encoded.query_pids[q]).tolist()
        path = Path(out_dir) / f"query_{rank:03d}.png"
        ranking_page(data.query_captions[q], [data.gallery_paths[i] for i in order.tolist()], matches, path,
                     title=f"query {q} (id {int(encoded.query_pids[q])}): top {top} of {len(gallery)}")
        pages.append(path)
    return pages
