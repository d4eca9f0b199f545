"""Training curves from train.py's metrics.jsonl, drawn with matplotlib (Agg canvas, no display, no pyplot state)."""
from __future__ import annotations

import io
import json
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from utils.files import atomic_write

METRICS = (("R1", "R@1"), ("mAP", "mAP"), ("mINP", "mINP"))
# Which split an evaluation ran on is visible at each point; val_carved: training ids held out as val (ICFG-PEDES).
SPLIT_MARKERS = {"val": "o", "val_carved": "o", "test": "s"}
PROXY_COLOR = "dimgrey"  # the legend's split markers (each metric draws them in its own colour)


def read_history(metrics_jsonl: str | Path) -> list[dict]:
    """The rows of metrics.jsonl (one per epoch, epoch 0 = the untrained model when recorded)."""
    rows = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{metrics_jsonl}: no epochs recorded yet")
    return rows


def training_curves_figure(rows: list[dict]) -> Figure:
    """Two panels sharing the epoch axis: each loss part (log scale) and text-to-image R@1/mAP/mINP (%), with the
    evaluation split marked per point (the legend names the markers of the splits present) and the best R@1 epoch
    as a dashed line."""
    figure = Figure(figsize=(9, 7), dpi=100, layout="constrained")
    losses, metrics = figure.subplots(2, 1, sharex=True)
    loss_keys = sorted({k for row in rows for k in row if k.startswith("loss")})
    for key in loss_keys:
        points = [(row["epoch"], row[key]) for row in rows if key in row and row[key] > 0]
        if points:
            losses.plot(*zip(*points), marker=".", label=key.removeprefix("loss_") if key != "loss" else "total")
    losses.set_yscale("log")
    losses.set_ylabel("loss (weighted part, log scale)")
    losses.set_title("training losses per epoch")
    for key, label in METRICS:
        evaluated = [row for row in rows if key in row]
        if not evaluated:
            continue
        line, = metrics.plot([r["epoch"] for r in evaluated], [r[key] for r in evaluated], label=label)
        for split, marker in SPLIT_MARKERS.items():
            marked = [r for r in evaluated if r.get("eval_split", "val") == split]
            if marked:
                metrics.plot([r["epoch"] for r in marked], [r[key] for r in marked], linestyle="none",
                             marker=marker, color=line.get_color())
    scored = [row for row in rows if "R1" in row]
    if scored:
        best = max(scored, key=lambda row: row["R1"])
        split = best.get("eval_split", "val")
        metrics.axvline(best["epoch"], color="grey", linestyle="--",
                        label=f"best R@1 {best['R1']:.2f} (epoch {best['epoch']}, {split})")
    splits = [s for s in SPLIT_MARKERS if any(row.get("eval_split", "val") == s for row in scored)]
    for marker in dict.fromkeys(SPLIT_MARKERS[s] for s in splits):  # one legend entry per marker drawn
        named = " / ".join(s for s in splits if SPLIT_MARKERS[s] == marker)
        metrics.plot([], [], linestyle="none", marker=marker, color=PROXY_COLOR, label=f"evaluated on {named}")
    metrics.set_title("text-to-image retrieval on " + " and ".join(splits) if splits else "no evaluation recorded yet")
    metrics.set_xlabel("epoch")
    metrics.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    metrics.set_ylabel("%")
    for axes in (losses, metrics):
        axes.grid(True, which="major", alpha=0.4)
        if axes.has_data():
            axes.legend(loc="best", fontsize="small")
    return figure


def plot_training_curves(metrics_jsonl: str | Path, out_path: str | Path) -> None:
    """Loss parts and retrieval metrics per epoch from metrics.jsonl as one PNG, written atomically."""
    figure = training_curves_figure(read_history(metrics_jsonl))
    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    atomic_write(out_path, lambda f: f.write(buffer.getvalue()))
