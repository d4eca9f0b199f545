"""scripts/seeds.py: several seeds of one config, each trained and tested, then mean ± std."""
import json
import statistics
import subprocess
import sys

import pytest

from tests.conftest import REPO, TINY_TRAIN_FLAGS


def test_two_seeds_train_test_and_summarise(processed_root, tmp_path):
    out = tmp_path / "seeds"
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"epochs": 1}))
    command = [sys.executable, "scripts/seeds.py", "--config", str(config), "--seeds", "3", "4", "--out", str(out),
               "--", "--data_root", str(processed_root), *TINY_TRAIN_FLAGS]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads((out / "seeds.json").read_text())
    per_seed = {int(s): m for s, m in report["per_seed"].items()}
    assert sorted(per_seed) == [3, 4]
    for seed in (3, 4):  # each number is that seed's own test.py result
        own = json.loads((out / f"seed_{seed}" / "eval_test" / "metrics.json").read_text())
        assert own["split"] == "test" and per_seed[seed]["t2i"] == own["t2i"]
        assert json.loads((out / f"seed_{seed}" / "config.json").read_text())["args"]["seed"] == seed
    r1 = [per_seed[s]["t2i"]["R1"] for s in (3, 4)]
    assert report["summary"]["R1"]["mean"] == statistics.fmean(r1)
    # Python floats, relative: the sample std of two values is |a - b| / sqrt(2) up to a few roundings (0 when equal).
    assert report["summary"]["R1"]["std"] == pytest.approx(abs(r1[0] - r1[1]) / 2**0.5, rel=1e-12)
    table = (out / "seeds.md").read_text()
    assert "| 3 |" in table and "| 4 |" in table and "mean ± std" in table

    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)  # nothing left to run
    assert again.returncode == 0 and again.stdout.count("exists, reusing it") == 2 and "train.py" not in again.stdout


def test_one_seed_has_a_mean_and_no_standard_deviation():
    from scripts.seeds import mean_std, summarise

    one = summarise({7: {"t2i": {key: 50.0 + i for i, key in enumerate(("R1", "R5", "R10", "mAP", "mINP"))}}})
    assert one["R1"] == {"mean": 50.0, "std": None} and mean_std(one["R5"]) == "51.00"
    two = summarise({1: {"t2i": dict.fromkeys(("R1", "R5", "R10", "mAP", "mINP"), 60.0)},
                     2: {"t2i": dict.fromkeys(("R1", "R5", "R10", "mAP", "mINP"), 62.0)}})
    assert mean_std(two["mAP"]) == f"61.00 ± {2 ** 0.5:.2f}"
