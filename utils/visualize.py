"""Pictures of results: ranked galleries for text queries, and training curves from metrics.jsonl (Pillow only)."""
from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

GREEN, RED, GREY, BLACK, WHITE = (40, 170, 60), (210, 40, 40), (150, 150, 150), (20, 20, 20), (255, 255, 255)
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


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
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    page.save(out_path)


def _polyline_chart(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], title: str,
                    series: dict[str, list[tuple[float, float]]], log_scale: bool = False) -> None:
    """Lines of (x, y) points in box; log_scale plots log10(y) (losses span orders of magnitude)."""
    left, top, right, bottom = box
    if log_scale:
        series = {name: [(x, math.log10(y)) for x, y in values if y > 0] for name, values in series.items()}
        title += " (log10 scale)"
    font = _font(12)
    draw.rectangle(box, outline=BLACK)
    draw.text((left + 4, top - 16), title, fill=BLACK, font=font)
    points = [p for values in series.values() for p in values]
    if not points:
        draw.text((left + 10, top + 10), "no data", fill=BLACK, font=font)
        return
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    draw.text((left + 2, top + 2), f"{y1:.3g}", fill=BLACK, font=font)
    draw.text((left + 2, bottom - 14), f"{y0:.3g}", fill=BLACK, font=font)
    draw.text((right - 60, bottom + 2), f"epoch {x1:g}", fill=BLACK, font=font)

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        return (left + 40 + (x - x0) / (x1 - x0) * (right - left - 50),
                bottom - 10 - (y - y0) / (y1 - y0) * (bottom - top - 20))

    for i, (name, values) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        pixels = [to_pixel(x, y) for x, y in values]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        for px, py in pixels:
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
        draw.text((right + 8, top + 16 * i), name, fill=colour, font=font)


def plot_training_curves(metrics_jsonl: str | Path, out_path: str | Path) -> None:
    """Loss parts and retrieval metrics (R1, mAP) per epoch from train.py's metrics.jsonl, as one PNG."""
    rows = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{metrics_jsonl}: no epochs recorded yet")
    loss_keys = sorted({k for row in rows for k in row if k.startswith("loss")})
    metric_keys = [k for k in ("R1", "mAP", "mINP") if any(k in row for row in rows)]
    losses = {k: [(row["epoch"], row[k]) for row in rows if k in row] for k in loss_keys}
    metrics = {k: [(row["epoch"], row[k]) for row in rows if k in row] for k in metric_keys}
    page = Image.new("RGB", (900, 640), WHITE)
    draw = ImageDraw.Draw(page)
    _polyline_chart(draw, (20, 30, 720, 300), "training losses", losses, log_scale=True)
    _polyline_chart(draw, (20, 350, 720, 620), "retrieval (text-to-image, %)", metrics)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    page.save(out_path)
