"""Loaders: shapes, dtypes, pid remapping, reproducible shuffling/flipping, evaluation data and clear errors."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from datasets import prepare
from datasets.base import DataError
from datasets.build import TrainPairs, available_splits, build_eval_data, build_train_loader, default_workers, flip_coin
from datasets.images import usable_cpus
from datasets.processed import load_split
from datasets.sampler import EpochSampler
from datasets.transforms import MEAN_STD, ImageDecodeError, ImageTransform, ResizeToUint8, load_rgb, to_model_input
from tests.messy_data import LONG_TAIL, make_dataset, read_annotation, write_annotation
from tests.tolerance import assert_close

SOT, EOT = 49406, 49407
SIZE = (32, 16)


@pytest.fixture(scope="module")
def processed(tmp_path_factory):
    """CUHK-PEDES (sparse original ids, one over-long caption) and ICFG-PEDES, both through data.sh's module."""
    root = tmp_path_factory.mktemp("raw")
    cuhk = make_dataset(root, "CUHK-PEDES", ids=20, images_per_id=3)
    path, records = read_annotation(cuhk)
    for r in records:
        r["id"] = 1000 - 7 * r["id"]  # sparse and in reverse order: remapping must sort
    records[0]["captions"][0] += LONG_TAIL
    write_annotation(path, records)
    make_dataset(root, "ICFG-PEDES", ids=10, images_per_id=2)
    out = tmp_path_factory.mktemp("out") / "processed_data"
    assert prepare.main([str(root), "all", "--out", str(out), "--workers", "1"]) == 0
    return out


def test_train_batches_have_contract_shapes_and_dtypes(processed):
    loader = build_train_loader(processed / "CUHK-PEDES", image_size=(384, 128), batch_size=8, workers=0)
    batch = next(iter(loader))
    assert batch["images"].shape == (8, 3, 384, 128) and batch["images"].dtype == torch.uint8  # a quarter of float32
    assert batch["flips"].shape == (8,) and batch["flips"].dtype == torch.bool
    assert batch["tokens"].shape == (8, 77) and batch["tokens"].dtype == torch.long
    assert batch["pids"].shape == (8,) and batch["pids"].dtype == torch.long
    assert (batch["tokens"][:, 0] == SOT).all() and (batch["tokens"].argmax(1) > 0).all()
    assert loader.num_workers == 0 and loader.drop_last


def test_pids_are_remapped_to_0_c_minus_1_in_sorted_order(processed):
    records = json.loads((processed / "CUHK-PEDES" / "train_reid.json").read_text())
    loader = build_train_loader(processed / "CUHK-PEDES", image_size=SIZE, batch_size=4, workers=0)
    dataset = loader.dataset
    original = sorted({r["pid"] for r in records})
    assert dataset.num_classes == len(original) == 16
    expected = [original.index(r["pid"]) for r in records for _ in r["captions"]]
    assert dataset.pids.tolist() == expected
    assert len(dataset) == sum(len(r["captions"]) for r in records)


def test_captions_are_tokenised_once_with_truncation(processed):
    dataset = build_train_loader(processed / "CUHK-PEDES", image_size=SIZE, batch_size=4, workers=0).dataset
    assert dataset.tokens.shape == (len(dataset), 77)
    long_row = dataset.tokens[0]  # record 0's first caption carries the over-long tail
    assert long_row[-1] == EOT and (long_row != 0).all()
    short_row = dataset.tokens[1]
    assert (short_row[short_row.argmax() + 1:] == 0).all()


def test_flip_is_a_pure_function_of_seed_epoch_and_index(processed):
    dataset = build_train_loader(processed / "CUHK-PEDES", image_size=SIZE, batch_size=4, workers=0).dataset
    coins = [flip_coin(42, 0, i) for i in range(len(dataset))]
    assert 0.3 < np.mean(coins) < 0.7 and coins == [flip_coin(42, 0, i) for i in range(len(dataset))]
    assert coins != [flip_coin(42, 1, i) for i in range(len(dataset))]
    assert coins != [flip_coin(7, 0, i) for i in range(len(dataset))]
    flipped, kept = coins.index(True), coins.index(False)
    for index, flip in ((flipped, True), (kept, False)):
        item = dataset[(0, index)]
        image = load_rgb(dataset.image_paths[dataset.pair_image[index]])
        assert bool(item["flips"]) == flip and torch.equal(item["images"], dataset.transform(image))
        # On the device: the same values as the all-in-the-worker float path, bit for bit.
        model_input = to_model_input(item["images"][None], "clip", item["flips"][None])[0]
        assert torch.equal(model_input, ImageTransform(SIZE, "clip")(image, flip))
        assert not torch.equal(model_input, ImageTransform(SIZE, "clip")(image, not flip))
    dataset.set_epoch(0)
    assert torch.equal(dataset[flipped]["images"], dataset[(0, flipped)]["images"])


def test_sampler_order_depends_only_on_seed_and_epoch():
    a, b = EpochSampler(103, 8, seed=1), EpochSampler(103, 8, seed=1)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b) and len(list(a)) == len(a) == 96 and all(e == 3 for e, _ in a)
    b.set_epoch(4)
    assert [i for _, i in a] != [i for _, i in b]
    b.set_epoch(3, start_batch=5)
    assert list(b) == list(a)[40:] and len(b) == 56


def test_replicas_take_disjoint_equal_slices():
    replicas = [EpochSampler(103, 8, seed=1, num_replicas=3, rank=r) for r in range(3)]
    orders = [[i for _, i in s] for s in replicas]
    assert all(len(o) == 32 for o in orders)  # 103 // (8 * 3) = 4 batches each
    assert len(set().union(*orders)) == 96 and all(0 <= i < 103 for o in orders for i in o)
    # Concatenated in rank order, each global batch is one process's batch of 24, same order.
    single = [i for _, i in EpochSampler(103, 24, seed=1)]
    merged = [i for b in range(4) for o in orders for i in o[b * 8:(b + 1) * 8]]
    assert merged == single
    with pytest.raises(ValueError, match="fewer than one batch"):
        EpochSampler(10, 8, num_replicas=2)


def test_batches_do_not_depend_on_worker_count(processed):
    def epoch_batches(workers):
        loader = build_train_loader(processed / "CUHK-PEDES", image_size=SIZE, batch_size=16, workers=workers, seed=3)
        loader.sampler.set_epoch(2)
        return list(loader), len(loader.dataset)

    (serial, pairs), (parallel, _) = epoch_batches(0), epoch_batches(2)
    assert len(serial) == len(parallel) == pairs // 16 >= 2
    for x, y in zip(serial, parallel):
        assert all(torch.equal(x[k], y[k]) for k in ("images", "flips", "tokens", "pids"))


def test_eval_data_gallery_once_and_every_caption_a_query(processed):
    records = json.loads((processed / "CUHK-PEDES" / "test_reid.json").read_text())
    data = build_eval_data(processed / "CUHK-PEDES", "test", image_size=SIZE, batch_size=4, workers=0)
    batches = list(data.gallery_loader)
    sizes = [4] * (len(records) // 4) + ([len(records) % 4] if len(records) % 4 else [])
    assert [len(b["index"]) for b in batches] == sizes and sizes[-1] != 4  # the partial last batch is kept
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(len(records)))
    assert torch.equal(torch.cat([b["pids"] for b in batches]), data.gallery_pids)
    assert data.gallery_pids.tolist() == [r["pid"] for r in records]  # evaluation keeps original ids
    assert batches[0]["images"].shape[1:] == (3, *SIZE)
    captions = [c for r in records for c in r["captions"]]
    assert data.query_captions == captions and data.query_tokens.shape == (len(captions), 77)
    assert data.query_pids.dtype == torch.long
    assert data.query_pids.tolist() == [r["pid"] for r in records for _ in r["captions"]]
    assert all(p.startswith("/") and p.endswith(r["image"]) for p, r in zip(data.gallery_paths, records))


def test_splits_and_missing_data_errors(processed, tmp_path):
    assert available_splits(processed / "CUHK-PEDES") == ["train", "val", "test"]
    assert available_splits(processed / "ICFG-PEDES") == ["train", "test"]
    with pytest.raises(DataError, match="ICFG-PEDES has no val split"):
        build_eval_data(processed / "ICFG-PEDES", "val")
    with pytest.raises(DataError, match="run `bash data.sh"):
        build_train_loader(tmp_path / "processed_data" / "RSTPReid")
    copy = tmp_path / "copy"
    shutil.copytree(processed / "ICFG-PEDES", copy)
    records = json.loads((copy / "train_reid.json").read_text())
    records[4]["captions"] = []
    (copy / "train_reid.json").write_text(json.dumps(records))
    with pytest.raises(DataError, match="record 4 is not"):
        load_split(copy, "train")
    meta = json.loads((copy / "meta.json").read_text())
    meta["image_root"] = str(tmp_path / "moved")
    (copy / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="no longer exists"):
        load_split(copy, "test")
    (copy / "meta.json").unlink()
    with pytest.raises(DataError, match="meta.json is missing"):
        available_splits(copy)


@pytest.mark.parametrize("damage, expected", [
    (lambda d: (d / "train_reid.json").write_text("[" * 100_000 + "]" * 100_000), "train_reid.json is nested"),
    (lambda d: (d / "meta.json").write_text("[" * 100_000 + "]" * 100_000), "meta.json is nested"),
    (lambda d: (d / "train_reid.json").write_text(json.dumps([{"pid": 2 ** 64, "image": "a.jpg", "captions": ["a"]}])),
     "record 0 is not"),
])
def test_damaged_processed_files_are_data_errors(processed, tmp_path, damage, expected):
    copy = tmp_path / "copy"
    shutil.copytree(processed / "ICFG-PEDES", copy)
    damage(copy)
    with pytest.raises(DataError, match=expected):
        load_split(copy, "train")


def test_a_processed_folder_moved_aside_by_a_killed_data_sh_says_how_to_get_it_back(processed, tmp_path):
    shutil.copytree(processed / "ICFG-PEDES", tmp_path / ".ICFG-PEDES.old-ab12cd_3" / "previous")
    with pytest.raises(DataError, match=r"\.ICFG-PEDES\.old-ab12cd_3/previous.*re-run .*data\.sh"):
        load_split(tmp_path / "ICFG-PEDES", "train")


def test_undecodable_image_names_the_file(processed, tmp_path):
    split = load_split(processed / "ICFG-PEDES", "train")
    broken = tmp_path / "imgs"
    shutil.copytree(split.image_root, broken)
    target = broken / split.records[0]["image"]
    target.write_bytes(target.read_bytes()[:200])
    dataset = TrainPairs(type(split)("train", broken, split.records), ResizeToUint8(SIZE))
    with pytest.raises(ImageDecodeError, match=str(target)):
        dataset[0]


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16"])
def test_every_mode_loads_as_rgb(tmp_path, mode):
    path = tmp_path / ("x.jpg" if mode in ("L", "CMYK") else "x.png")
    Image.new("RGB", (20, 40), (200, 30, 60)).convert(mode).save(path)
    image = load_rgb(str(path))
    assert image.mode == "RGB" and image.size == (20, 40)
    assert ImageTransform((32, 16))(image).shape == (3, 32, 16)


@pytest.mark.parametrize("stats", ["clip", "imagenet"])
def test_normalisation_uses_the_chosen_mean_and_std(stats):
    colour = (200, 30, 60)
    out = ImageTransform((8, 4), stats)(Image.new("RGB", (17, 33), colour))
    mean, std = MEAN_STD[stats]
    expected = [(c / 255 - m) / s for c, m, s in zip(colour, mean, std)]
    assert_close(out.mean(dim=(1, 2)), torch.tensor(expected), 1e-6)  # fp32 vs float64, relative (measured 7.9e-8)
    with pytest.raises(ValueError, match="mean_std"):
        ImageTransform((8, 4), "laion")
    pixels = torch.tensor(colour, dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 8, 4)
    torch.testing.assert_close(to_model_input(pixels, stats)[0], out, rtol=0, atol=0)
    with pytest.raises(ValueError, match="mean_std"):
        to_model_input(pixels, "laion")


def test_default_workers_and_pinning_are_sensible(processed):
    loader = build_train_loader(processed / "ICFG-PEDES", image_size=SIZE, batch_size=4)
    assert loader.num_workers == default_workers() == max(0, usable_cpus() - 1)  # no fixed cap: big nodes use all
    assert default_workers(processes=2) == max(0, usable_cpus() // 2 - 1)
    assert loader.pin_memory == torch.cuda.is_available()
