"""evaluation/visualize.py: ranked-gallery pages with coloured frames, and training curves."""
import json

from PIL import Image

from evaluation.curves import plot_training_curves
from evaluation.visualize import GREEN, GREY, RED, ranking_page


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


def test_pictures_replace_a_planted_link_instead_of_writing_through_it(tmp_path):
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"not to be touched")
    gallery = tmp_path / "g.png"
    Image.new("RGB", (20, 40), (0, 0, 255)).save(gallery)
    out = tmp_path / "out"
    out.mkdir()
    for name in ("page.png", "curves.png"):
        (out / name).symlink_to(victim)
    ranking_page("a caption", [str(gallery)], [True], out / "page.png", tile=(40, 80))
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"epoch": 1, "loss": 2.0, "R1": 10.0}) + "\n")
    plot_training_curves(metrics, out / "curves.png")
    assert victim.read_bytes() == b"not to be touched"
    for name in ("page.png", "curves.png"):
        assert not (out / name).is_symlink()
        with Image.open(out / name) as image:
            assert image.format == "PNG"
