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
