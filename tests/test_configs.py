"""configs/*_paper.json: the authors' released setting (docs/method.md §6 and §9), spelled out in full."""
import json

import pytest

import train
from tests.conftest import REPO

SPEC_6 = {"batch_size": 32, "epochs": 50, "lr_head": 1e-4, "lr_image": 1e-5, "lr_text": 1e-5, "wd_image": 4e-5,
          "warmup_epochs": 10, "warmup_start": 0.01, "milestones": [20, 25, 35], "gamma": 0.1, "seed": 42,
          "cmpm_weights": [1.0, 1.0, 0.1], "cmpc_weights": [1.0, 1.0, 1.0], "diversity_weight": 0.2,
          "ranking_weight": 10.0, "margin": 0.2}
SPEC_9 = {"text_encoder": "bert", "clip": "ViT-B/16", "image_size": [224, 224], "mean_std": "imagenet", "amp": "off"}
PAPER = {"cuhk_pedes_paper.json": "CUHK-PEDES", "icfg_pedes_paper.json": "ICFG-PEDES", "rstpreid_paper.json": "RSTPReid"}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_configs_hold_every_spec_value(name):
    path = REPO / "configs" / name
    raw = json.loads(path.read_text())
    assert {**SPEC_6, **SPEC_9}.items() <= raw.items()  # written out in the file, not inherited from defaults
    args = train.parse_args(["--config", str(path)])
    assert args.dataset == PAPER[name] and args.bert == "pretrained/bert-base-uncased"
    for key, value in {**SPEC_6, **SPEC_9}.items():
        assert getattr(args, key) == value, key


# configs/ablations/: the rows of the paper's ablation table (configs/README.md), restated here.
ABLATION_ROWS = {
    "1_baseline": {"mgf": "off", "cfr": "off", "fcd": "off", "diversity_weight": 0.0, "ranking_weight": 0.0},
    "2_mgf": {"mgf": "on", "cfr": "off", "fcd": "off", "diversity_weight": 0.2, "ranking_weight": 0.0},
    "3_mgf_cfr": {"mgf": "on", "cfr": "on", "fcd": "off", "diversity_weight": 0.2, "ranking_weight": 10.0},
    "4_mgf_fcd": {"mgf": "on", "cfr": "off", "fcd": "on", "diversity_weight": 0.2, "ranking_weight": 10.0},
    "5_full": {"mgf": "on", "cfr": "on", "fcd": "on", "diversity_weight": 0.2, "ranking_weight": 10.0},
}
ABLATION_BASES = {"clip": "cuhk_pedes.json", "paper": "cuhk_pedes_paper.json"}
# What a row may change from its base config.
ABLATION_KEYS = {"mgf", "cfr", "fcd", "cmpm_weights", "cmpc_weights", "diversity_weight", "ranking_weight", "margin"}


def test_each_ablation_folder_holds_the_five_rows():
    for mode in ABLATION_BASES:
        assert sorted(p.stem for p in (REPO / "configs" / "ablations" / mode).iterdir()) == sorted(ABLATION_ROWS)


def test_the_ablation_keys_are_the_ones_scripts_ablations_keeps_the_rows():
    from engine.settings import ABLATION_KEYS as kept

    assert set(kept) == ABLATION_KEYS


@pytest.mark.parametrize("mode", sorted(ABLATION_BASES))
@pytest.mark.parametrize("row", sorted(ABLATION_ROWS))
def test_ablation_rows_are_their_base_config_plus_the_rows_switches_and_weights(mode, row):
    path = REPO / "configs" / "ablations" / mode / f"{row}.json"
    raw = json.loads(path.read_text())
    base = json.loads((REPO / "configs" / ABLATION_BASES[mode]).read_text())
    changed = {key for key in raw.keys() | base.keys() if raw.get(key, "absent") != base.get(key, "absent")}
    assert changed <= ABLATION_KEYS | {"output_dir"}, changed - ABLATION_KEYS
    assert raw["output_dir"] == f"runs/ablations/{mode}/{row}"
    assert ABLATION_ROWS[row].items() <= raw.items()  # written out in the file
    args = train.parse_args(["--config", str(path)])  # runnable as it is: every value and rule checked
    for key, value in ABLATION_ROWS[row].items():
        assert getattr(args, key) == value, key
    assert args.text_encoder == ("bert" if mode == "paper" else "clip") and args.dataset == "CUHK-PEDES"
    if mode == "paper":
        assert args.tf32 == "on"
