"""datasets/holdout.py: a validation split carved from the training identities (ICFG-PEDES has none)."""
import pytest

from datasets import prepare
from datasets.build import build_eval_data, build_train_loader
from datasets.holdout import carve_validation_ids, split_off
from datasets.processed import available_splits, load_split
from datasets.synthetic.generate import generate as generate_synthetic


@pytest.fixture(scope="module")
def icfg(tmp_path_factory):
    base = tmp_path_factory.mktemp("icfg")
    generate_synthetic(base / "raw", "ICFG-PEDES", ids=60, images_per_id=2, seed=2)
    assert prepare.main([str(base / "raw"), "ICFG-PEDES", "--out", str(base / "processed"), "--workers", "1"]) == 0
    return base / "processed" / "ICFG-PEDES"


def test_carved_ids_are_five_percent_deterministic_and_seed_dependent():
    ids = list(range(100, 3202))  # ICFG-PEDES's 3,102 training identities
    chosen = carve_validation_ids(ids, seed=42)
    assert len(chosen) == 156 and chosen == sorted(chosen) and set(chosen) <= set(ids)
    assert chosen == carve_validation_ids(reversed(ids), seed=42)  # order of the input does not matter
    assert chosen != carve_validation_ids(ids, seed=7)
    assert len(carve_validation_ids([1, 2, 3], seed=0)) == 1
    with pytest.raises(ValueError, match="at least 3"):
        carve_validation_ids([1, 2], seed=0)


def test_loaders_train_without_and_evaluate_on_the_held_out_ids(icfg):
    assert "val" not in available_splits(icfg)
    train = load_split(icfg, "train")
    held = carve_validation_ids([r["pid"] for r in train.records], seed=42)
    rest, val = split_off(train, held)
    assert {r["pid"] for r in val.records} == set(held) and not {r["pid"] for r in rest.records} & set(held)
    assert len(rest.records) + len(val.records) == len(train.records)

    loader = build_train_loader(icfg, image_size=(32, 16), batch_size=4, workers=0, held_out_ids=held)
    original_pid = {label: pid for pid, label in loader.dataset.pid_map.items()}
    assert not {original_pid[int(p)] for p in loader.dataset.pids} & set(held)
    assert loader.dataset.num_classes == len({r["pid"] for r in train.records}) - len(held)
    data = build_eval_data(icfg, "val", image_size=(32, 16), workers=0, held_out_ids=held)
    test_images = {r["image"] for r in load_split(icfg, "test").records}
    assert set(data.gallery_pids.tolist()) == set(held)
    assert not {p.rsplit("imgs/", 1)[-1] for p in data.gallery_paths} & test_images
    with pytest.raises(ValueError, match="make a 'val' split"):
        build_eval_data(icfg, "test", image_size=(32, 16), workers=0, held_out_ids=held)
