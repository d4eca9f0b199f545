"""utils/visualize.py: ranked-gallery pages with coloured frames, and training curves."""
import json

import pytest
from PIL import Image

from utils.visualize import GREEN, GREY, RED, plot_training_curves, ranking_page


def test_ranking_page_frames_matches_green_and_others_red(tmp_path):
    paths = []
    for i, colour in enumerate([(0, 0, 255), (255, 255, 0), (0, 0, 0)]):
        path = tmp_path / f"g{i}.png"
        Image.new("L" if i == 2 else "RGB", (20, 40), 0 if i == 2 else colour).save(path)  # a grayscale one too
        paths.append(str(path))
    out = tmp_path / "page.png"
    ranking_page("a man in a blue coat", paths, [True, False, False], out, tile=(40, 80))
    with Image.open(out) as page:
        page = page.convert("RGB")
        frame_y = page.height - 18 - 8 - 80 + 2  # two pixels inside each tile's top border
        assert page.getpixel((8 + 2, frame_y)) == GREEN
        assert page.getpixel((8 + 48 + 2, frame_y)) == RED
        assert page.getpixel((8 + 2 * 48 + 2, frame_y)) == RED


def test_ranking_page_without_ground_truth_frames_grey_and_writes_labels(tmp_path):
    paths = []
    for i in range(2):
        Image.new("RGB", (20, 40), (0, 0, 255)).save(tmp_path / f"g{i}.png")
        paths.append(str(tmp_path / f"g{i}.png"))
    ranking_page("someone", paths, None, tmp_path / "plain.png", tile=(80, 80), labels=["1: 0.812", "2: 0.500"])
    ranking_page("someone", paths, None, tmp_path / "numbers.png", tile=(80, 80))
    with Image.open(tmp_path / "plain.png") as page, Image.open(tmp_path / "numbers.png") as numbers:
        frame_y = page.height - 18 - 8 - 80 + 2
        assert page.convert("RGB").getpixel((8 + 2, frame_y)) == GREY
        assert page.convert("RGB").getpixel((8 + 88 + 2, frame_y)) == GREY
        label_row = (0, page.height - 18, page.width, page.height)
        assert page.crop(label_row).tobytes() != numbers.crop(label_row).tobytes()  # the labels were drawn


def test_training_curves_from_metrics_jsonl(tmp_path):
    rows = [{"epoch": 0, "R1": 5.0, "mAP": 9.0}] + [
        {"epoch": e, "loss": 100.0 / e, "loss_cmpm": 10.0 / e, "R1": 10.0 * e, "mAP": 8.0 * e} for e in (1, 2, 3)]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot_training_curves(metrics, tmp_path / "curves.png")
    with Image.open(tmp_path / "curves.png") as image:
        assert image.size == (900, 640)
        colours = {image.convert("RGB").getpixel((x, y)) for x in range(20, 720, 3) for y in range(30, 620, 3)}
        assert len(colours) > 4  # lines were drawn, not just the frames
    metrics.write_text("")
    with pytest.raises(ValueError, match="no epochs recorded"):
        plot_training_curves(metrics, tmp_path / "empty.png")
