"""Honest selection: on ICFG-PEDES (no val split) train.py selects best.pt on training ids it held out, and never
opens a test-split image; --select_on test is the only way to select on test; test.py --split val evaluates the
held-out ids again."""
import json
import sys
from pathlib import Path

import pytest

import datasets.build
import engine.data
import test as evaluate_script
import train
from datasets import prepare
from datasets.holdout import carve_validation_ids
from datasets.processed import load_split
from datasets.synthetic.generate import generate as generate_synthetic
from models.checkpoint import load_checkpoint
from tests.conftest import TINY_TRAIN_FLAGS, metrics_rows

FLAGS = [*TINY_TRAIN_FLAGS, "--epochs", "2", "--seed", "3"]


pytestmark = pytest.mark.usefixtures("module_single_thread")  # tiny runs: threads only add overhead


@pytest.fixture(scope="module")
def icfg_root(tmp_path_factory) -> Path:
    """processed_data-style folder holding a synthetic ICFG-PEDES (train and test splits only)."""
    base = tmp_path_factory.mktemp("icfg")
    generate_synthetic(base / "raw", "ICFG-PEDES", ids=48, images_per_id=3, seed=4)
    assert prepare.main([str(base / "raw"), "ICFG-PEDES", "--out", str(base / "processed"), "--workers", "1"]) == 0
    return base / "processed"


def image_files(root: Path, split: str) -> set[str]:
    records = load_split(root / "ICFG-PEDES", split)
    return {str(records.image_root / r["image"]) for r in records.records}


class OpenedImages:
    """Spy on datasets.build.load_rgb (both training pairs and the evaluation gallery read images through it)."""

    def __init__(self, monkeypatch):
        self.paths: list[str] = []
        self.trained_on: list[str] = []  # those read by the training pairs (TrainPairs)
        real = datasets.build.load_rgb

        def spy(path):
            self.paths.append(str(path))
            if isinstance(sys._getframe(1).f_locals.get("self"), datasets.build.TrainPairs):
                self.trained_on.append(str(path))
            return real(path)
        monkeypatch.setattr(datasets.build, "load_rgb", spy)


@pytest.fixture(scope="module")
def carved_run(icfg_root, tmp_path_factory):
    """A 2-epoch ICFG-PEDES run with the default --select_on val, and every image it opened."""
    out = tmp_path_factory.mktemp("carved") / "run"
    with pytest.MonkeyPatch.context() as monkeypatch:
        opened = OpenedImages(monkeypatch)
        assert train.main(train.parse_args(["--dataset", "ICFG-PEDES", "--data_root", str(icfg_root),
                                            "--output_dir", str(out), *FLAGS])) == 0
    return out, opened


def test_training_never_opens_a_test_image_and_selects_on_the_held_out_ids(icfg_root, carved_run):
    out, spy = carved_run
    opened = spy.paths
    train_records = load_split(icfg_root / "ICFG-PEDES", "train")
    held = carve_validation_ids([r["pid"] for r in train_records.records], seed=3)
    held_images = {str(train_records.image_root / r["image"]) for r in train_records.records if r["pid"] in held}
    assert opened and not set(opened) & image_files(icfg_root, "test")
    assert held_images <= set(opened)  # the held-out ids were evaluated ...
    assert spy.trained_on and not set(spy.trained_on) & held_images  # ... and never trained on
    best = load_checkpoint(out / "best.pt")
    assert best["eval_split"] == "val_carved" and best["data"]["held_out_ids"] == held
    assert best["config"]["num_classes"] == len({r["pid"] for r in train_records.records}) - len(held)
    assert json.loads((out / "held_out_ids.json").read_text())["held_out_ids"] == held
    rows = metrics_rows(out, drop=())
    assert [r["eval_split"] for r in rows] == ["val_carved", "val_carved"]
    assert best["best"]["R1"] == max(r["R1"] for r in rows)


def test_test_py_split_val_evaluates_the_held_out_ids_and_test_is_unchanged(icfg_root, carved_run, monkeypatch):
    out, _ = carved_run
    best = load_checkpoint(out / "best.pt")
    held = best["data"]["held_out_ids"]
    for split in ("val", "test"):
        opened = OpenedImages(monkeypatch)
        args = evaluate_script.get_args_parser().parse_args(
            ["--checkpoint", str(out / "best.pt"), "--split", split, "--device", "cpu", "--workers", "0",
             "--no_progress"])
        assert evaluate_script.main(args) == 0
        metrics = json.loads((out / f"eval_{split}" / "metrics.json").read_text())
        if split == "val":
            assert metrics["split"] == "val_carved" and metrics["selected_on"] == "val_carved"
            train_records = load_split(icfg_root / "ICFG-PEDES", "train")
            assert set(opened.paths) == {str(train_records.image_root / r["image"])
                                         for r in train_records.records if r["pid"] in held}
            assert metrics["t2i"]["R1"] == pytest.approx(best["best"]["R1"])  # the number that selected best.pt
        else:
            assert metrics["split"] == "test" and set(opened.paths) == image_files(icfg_root, "test")


def test_resume_takes_the_held_out_ids_from_the_checkpoint(carved_run, monkeypatch, tmp_path):
    out, _ = carved_run
    run = tmp_path / "run"
    run.mkdir()
    for name in ("last.pt", "held_out_ids.json", "train.log"):
        (run / name).write_bytes((out / name).read_bytes())
    monkeypatch.setattr(engine.data, "carve_validation_ids", lambda *a, **k: pytest.fail("recomputed the held-out ids"))
    assert train.main(train.parse_args(["--resume", str(run / "last.pt"), "--epochs", "3"])) == 0
    last = load_checkpoint(run / "last.pt")
    assert last["data"]["held_out_ids"] == load_checkpoint(out / "last.pt")["data"]["held_out_ids"]
    assert last["history"][-1]["eval_split"] == "val_carved"


def test_select_on_test_is_loud_and_recorded(icfg_root, tmp_path, monkeypatch, capsys):
    opened = OpenedImages(monkeypatch)
    assert train.main(train.parse_args(["--dataset", "ICFG-PEDES", "--data_root", str(icfg_root), "--output_dir",
                                        str(tmp_path / "run"), *FLAGS, "--epochs", "1", "--select_on", "test"])) == 0
    assert "WARNING: --select_on test" in capsys.readouterr().err
    assert image_files(icfg_root, "test") <= set(opened.paths)
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert best["eval_split"] == "test" and best["args"]["select_on"] == "test"
    assert "held_out_ids" not in best["data"] and not (tmp_path / "run" / "held_out_ids.json").exists()
