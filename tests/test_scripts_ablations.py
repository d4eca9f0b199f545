"""scripts/ablations.py: every row of an ablation table over several seeds, trained and tested, in one table."""
import json
import shutil
import statistics
import subprocess
import sys

import pytest

from datasets import prepare
from datasets.synthetic.generate import generate as generate_synthetic
from tests.conftest import REPO

# The tiny model (tests/conftest.py TINY_TRAIN_FLAGS, at 32x32: 17 image tokens, k_img = 1) as a --base config, with
# ablation keys of its own that the rows must override.
TINY_BASE = {"clip": "none", "clip_arch": "tiny", "image_size": [32, 32], "batch_size": 16, "lr_head": 1e-3,
             "lr_image": 1e-3, "lr_text": 1e-3, "warmup_epochs": 1, "milestones": [3], "workers": 0, "device": "cpu",
             "epochs": 1, "mgf": "on", "ranking_weight": 3.0, "diversity_weight": 0.5, "output_dir": "elsewhere"}
ROWS = ("1_baseline", "5_full")
SEEDS = (3, 4)


def _ablations(*argv):
    return subprocess.run([sys.executable, "-m", "scripts.ablations", *map(str, argv)], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    """A processed synthetic CUHK-PEDES of 16 ids x 2 images (12 train ids, 3 steps an epoch): 8 runs stay short."""
    base = tmp_path_factory.mktemp("ablation_data")
    generate_synthetic(base / "raw", "CUHK-PEDES", ids=16, images_per_id=2, seed=1)
    assert prepare.main([str(base / "raw"), "CUHK-PEDES", "--out", str(base / "processed_data"), "--workers", "1"]) == 0
    return base / "processed_data"


@pytest.fixture
def rows_and_base(small_root, tmp_path):
    rows = tmp_path / "rows"
    rows.mkdir()
    for row in ROWS:
        shutil.copy(REPO / "configs" / "ablations" / "clip" / f"{row}.json", rows)
    base = tmp_path / "base.json"
    base.write_text(json.dumps({**TINY_BASE, "data_root": str(small_root)}))
    return rows, base


def test_two_rows_two_seeds_train_test_and_one_table(rows_and_base, tmp_path):
    rows, base = rows_and_base
    out = tmp_path / "out"
    argv = ["--rows", rows, "--seeds", *SEEDS, "--out", out, "--base", base, "--", "--no_progress"]
    result = _ablations(*argv)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads((out / "ablations.json").read_text())
    assert [row["name"] for row in report["rows"]] == list(ROWS)
    table = (out / "ablations.md").read_text()
    for row in report["rows"]:
        given = json.loads((REPO / "configs" / "ablations" / "clip" / f"{row['name']}.json").read_text())
        for seed in SEEDS:
            run = out / row["name"] / f"seed_{seed}"
            own = json.loads((run / "eval_test" / "metrics.json").read_text())
            assert own["split"] == "test" and row["per_seed"][str(seed)]["t2i"] == own["t2i"]
            args = json.loads((run / "config.json").read_text())["args"]
            assert args["seed"] == seed and args["epochs"] == 1 and args["clip_arch"] == "tiny"  # the base's
            for key in ("mgf", "cfr", "fcd", "diversity_weight", "ranking_weight"):  # the row's, not the base's
                assert args[key] == given[key] == row["settings"][key], key
        cells = []
        for metric in ("R1", "R5", "R10", "mAP", "mINP"):
            values = [row["per_seed"][str(seed)]["t2i"][metric] for seed in SEEDS]
            mean, std = statistics.fmean(values), statistics.stdev(values)
            assert row["summary"][metric]["mean"] == mean
            assert row["summary"][metric]["std"] == pytest.approx(std, rel=1e-12, abs=1e-12)
            cells.append(f"{mean:.2f} ± {std:.2f}")
        switches = " | ".join(given[s] for s in ("mgf", "cfr", "fcd"))
        assert f"| {row['name']} | {switches} |" in table and " | ".join(cells) + f" | {len(SEEDS)} |" in table
    assert len([line for line in table.splitlines() if line.startswith("| 1_") or line.startswith("| 5_")]) == 2

    again = _ablations(*argv)  # nothing left to run
    assert again.returncode == 0 and again.stdout.count("exists, reusing it") == 4 and "train.py" not in again.stdout


def test_a_row_that_cannot_start_or_a_flag_naming_an_ablation_key_stops_before_any_training(rows_and_base, tmp_path):
    rows, base = rows_and_base
    (rows / "6_no_similarity.json").write_text(json.dumps({"cfr": "off", "fcd": "off", "ranking_weight": 10}))
    result = _ablations("--rows", rows, "--seeds", 1, "--out", tmp_path / "out", "--base", base)
    assert result.returncode == 1
    assert "row 6_no_similarity" in result.stderr and "--cfr off with --fcd off leaves the ranking loss no " \
                                                      "similarity S" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not list((tmp_path / "out").glob("*/seed_*"))
    result = _ablations("--rows", rows, "--seeds", 1, "--out", tmp_path / "out", "--", "--ranking_weight", "0")
    assert result.returncode == 1 and "--ranking_weight after --: ranking_weight is an ablation key" in result.stderr
