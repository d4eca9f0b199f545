"""utils/curves.py: matplotlib training curves with labelled axes, grid, and the evaluation split marked."""
import json

import numpy as np
import pytest
from PIL import Image

from utils.curves import plot_training_curves, training_curves_figure

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
    assert "val and test" in metrics.get_title()


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
