"""evaluation/curves.py: matplotlib training curves with labelled axes, grid, and the evaluation split marked."""
import json

import numpy as np
import pytest
from PIL import Image

from evaluation.curves import plot_training_curves, training_curves_figure

ROWS = [{"epoch": 0, "R1": 5.0, "mAP": 9.0, "mINP": 2.0, "eval_split": "val"}] + [
    {"epoch": e, "loss": 100.0 / e, "loss_cmpm": 10.0 / e, "loss_ranking": 0.0, "R1": 10.0 * e, "mAP": 8.0 * e,
     "mINP": 3.0 * e, "eval_split": "val"} for e in (1, 2, 3)] + [
    {"epoch": 4, "loss": 20.0, "loss_cmpm": 2.0, "R1": 25.0, "mAP": 30.0, "mINP": 12.0, "eval_split": "test"}]


def test_figure_has_axes_labels_grid_data_and_split_markers():
    figure = training_curves_figure(ROWS)
    losses, metrics = figure.axes
    assert losses.get_yscale() == "log" and metrics.get_xlabel() == "epoch" and metrics.get_ylabel() == "%"
    assert all(line.get_visible() for line in losses.get_ygridlines()) and losses.get_ygridlines()
    lines = {line.get_label(): line for line in metrics.get_lines()}
    np.testing.assert_allclose(lines["R@1"].get_xdata(), [0, 1, 2, 3, 4])
    np.testing.assert_allclose(lines["R@1"].get_ydata(), [5, 10, 20, 30, 25])
    markers = {line.get_marker() for line in metrics.get_lines() if line.get_linestyle() == "None"}
    assert markers == {"o", "s"}  # val points and the test point are told apart
    best = [label for label in lines if label.startswith("best R@1")]
    assert best == ["best R@1 30.00 (epoch 3, val)"]
    loss_labels = {line.get_label() for line in losses.get_lines()}
    assert {"total", "cmpm"} <= loss_labels and "ranking" not in loss_labels  # zeros cannot sit on a log axis
    assert metrics.get_title() == "text-to-image retrieval on val and test"
    assert legend_markers(metrics) == {"evaluated on val": "o", "evaluated on test": "s"}
    assert all(int(tick) == tick for tick in metrics.get_xticks())  # whole epochs


def legend_markers(axes) -> dict[str, str]:
    """The legend's split entries: label -> the marker its handle shows."""
    legend = axes.get_legend()
    return {text.get_text(): handle.get_marker() for text, handle in zip(legend.get_texts(), legend.legend_handles)
            if text.get_text().startswith("evaluated on")}


def test_the_legend_names_only_the_markers_drawn():
    val_only = training_curves_figure([row for row in ROWS if row["eval_split"] == "val"]).axes[1]
    drawn = {line.get_marker() for line in val_only.get_lines() if line.get_linestyle() == "None" and len(line.get_xdata())}
    assert drawn == {"o"} and legend_markers(val_only) == {"evaluated on val": "o"}
    assert "square" not in val_only.get_title() and "circle" not in val_only.get_title()
    no_evaluation = training_curves_figure([{"epoch": 1, "loss": 3.0}]).axes[1]
    assert no_evaluation.get_legend() is None and no_evaluation.get_title() == "no evaluation recorded yet"


def test_png_is_written_atomically_and_empty_history_is_an_error(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    plot_training_curves(metrics, tmp_path / "curves.png")
    with Image.open(tmp_path / "curves.png") as image:
        assert image.size == (900, 700)
        pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # lines, text and grid, not a blank page
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    metrics.write_text("")
    with pytest.raises(ValueError, match="no epochs recorded"):
        plot_training_curves(metrics, tmp_path / "empty.png")


def test_carved_validation_points_are_marked_as_val():
    rows = [{**row, "eval_split": "val_carved"} for row in ROWS if row.get("eval_split", "val") == "val"]
    metrics = training_curves_figure(rows).axes[1]
    markers = {line.get_marker() for line in metrics.get_lines() if line.get_linestyle() == "None"}
    assert markers == {"o"} and "val_carved" in metrics.get_title()
    assert legend_markers(metrics) == {"evaluated on val_carved": "o"}
