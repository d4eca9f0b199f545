"""Synthetic pedestrians: exact raw layouts, determinism, and identities defined only by attribute combinations."""
import json
import random
import re
from collections import Counter, defaultdict

import numpy as np
import pytest
from PIL import Image

from datasets import BENCHMARKS
from datasets.synthetic.attributes import ATTRIBUTE_NAMES, COLOUR_WORDS, GARMENTS, identity_key, make_caption, sample_identities
from datasets.synthetic.generate import CUHK_SOURCES, generate, identities, main

NAMES = list(BENCHMARKS)
RAW_KEYS = {"CUHK-PEDES": {"split", "captions", "file_path", "processed_tokens", "id"},
            "ICFG-PEDES": {"split", "captions", "file_path", "processed_tokens", "id"},
            "RSTPReid": {"split", "captions", "img_path", "id"}}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    return {name: generate(root, name, ids=20, images_per_id=3, seed=5) for name in NAMES}


def _records(dataset_dir):
    bench = BENCHMARKS[dataset_dir.name]
    return json.loads((dataset_dir / bench.annotation_names[0]).read_text())


@pytest.mark.parametrize("name", NAMES)
def test_output_is_the_benchmarks_raw_layout(generated, name):
    root, bench = generated[name], BENCHMARKS[name]
    records = _records(root)
    assert sorted(p.name for p in root.iterdir()) == sorted(["imgs", bench.annotation_names[0]])
    assert all(set(r) == RAW_KEYS[name] for r in records) and len(records) == 60
    key = bench.image_key
    on_disk = {str(p.relative_to(root / "imgs")) for p in (root / "imgs").rglob("*") if p.is_file()}
    assert on_disk == {r[key] for r in records}  # every image referenced exactly once, nothing else
    ids_by_split = defaultdict(set)
    for r in records:
        ids_by_split[r["split"]].add(r["id"])
        assert isinstance(r["id"], int)
        with Image.open(root / "imgs" / r[key]) as img:
            assert img.size == (64, 128) and img.mode == "RGB"
    assert set(ids_by_split) == set(bench.splits)
    assert all(not (ids_by_split[a] & ids_by_split[b]) for a in bench.splits for b in bench.splits if a < b)
    counts = Counter(len(r["captions"]) for r in records)
    if name == "CUHK-PEDES":
        assert min(r["id"] for r in records) == 1 and set(counts) <= {2, 3} and counts[2] > 50
        assert {r[key].split("/")[0] for r in records} <= set(CUHK_SOURCES)
        assert {r[key].rsplit(".", 1)[1] for r in records} == {"jpg", "png", "bmp"}
        assert len(ids_by_split["train"]) == 16 and len(ids_by_split["val"]) == len(ids_by_split["test"]) == 2
    elif name == "ICFG-PEDES":
        assert set(counts) == {1} and len(ids_by_split["train"]) == 16 and len(ids_by_split["test"]) == 4
        for r in records:
            split, folder, _ = r[key].split("/")
            assert split == r["split"] and folder == f"{r['id']:04d}" and re.fullmatch(r"\d{4}", folder)
    else:
        assert min(r["id"] for r in records) == 0 and set(counts) == {2} and "/" not in records[0][key]
    if "processed_tokens" in RAW_KEYS[name]:
        assert all(len(r["processed_tokens"]) == len(r["captions"]) for r in records)


def test_generation_is_deterministic_per_seed(tmp_path):
    a = generate(tmp_path / "a", "RSTPReid", ids=6, images_per_id=2, seed=3)
    b = generate(tmp_path / "b", "RSTPReid", ids=6, images_per_id=2, seed=3)
    c = generate(tmp_path / "c", "RSTPReid", ids=6, images_per_id=2, seed=4)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert (a / "data_captions.json").read_bytes() != (c / "data_captions.json").read_bytes()
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files if f.suffix == ".jpg")


@pytest.mark.parametrize("n", [40, 200])
def test_identities_differ_only_by_combinations_of_shared_values(n):
    people = sample_identities(n, random.Random(n))
    assert len({identity_key(p) for p in people}) == n
    for name in ATTRIBUTE_NAMES:
        counts = Counter(p[name] for p in people if name in p)
        # no single value singles out an identity: each is worn by several people
        assert min(counts.values()) >= max(2, n // 40), (name, counts)
    # neither can a pair of attributes: most (upper colour, lower colour) pairs are shared at n=200
    if n == 200:
        pairs = Counter((p["upper_colour"], p["lower_colour"]) for p in people)
        assert sum(c for c in pairs.values() if c > 1) > n // 2


def test_images_vary_within_an_identity(generated):
    root = generated["RSTPReid"]
    records = [r for r in _records(root) if r["id"] == 0]
    pixels = [np.asarray(Image.open(root / "imgs" / r["img_path"]), dtype=np.float32) for r in records]
    assert all(np.abs(pixels[0] - p).mean() > 10 for p in pixels[1:])


def _mentions(caption, colour, garment):
    text = caption.lower()
    return any(c in text for c in COLOUR_WORDS.get(colour, [colour])) and any(g in text for g in GARMENTS[garment])


def test_captions_describe_the_identity_with_varied_wording(generated):
    people = identities(20, seed=5)
    records = _records(generated["CUHK-PEDES"])
    captions = [(r["id"] - 1, c) for r in records for c in r["captions"]]
    for pid, caption in captions:
        attrs = people[pid]
        assert _mentions(caption, attrs["upper_colour"], attrs["upper_type"]), caption
        assert _mentions(caption, attrs["lower_colour"], attrs["lower_type"]), caption
    assert len({c for _, c in captions}) == len(captions)  # no two captions identical
    first_words = Counter(c.split()[0] for _, c in captions)
    assert len(first_words) >= 3  # several templates in use


def test_caption_with_bag_and_hat_mentions_them_usually():
    attrs = {"gender": "woman", "hair": "blonde", "upper_type": "jacket", "upper_colour": "red",
             "lower_type": "trousers", "lower_colour": "black", "shoes": "white", "bag": "backpack",
             "hat": "cap", "bag_colour": "white", "hat_colour": "blue"}
    rng = random.Random(0)
    captions = [make_caption(attrs, rng) for _ in range(200)]
    assert sum(_mentions(c, "white", "backpack") for c in captions) > 150
    assert sum(_mentions(c, "blue", "cap") for c in captions) > 140
    assert all(c[0].isupper() and c.endswith(".") for c in captions)


def test_cli_refuses_to_overwrite_without_force(tmp_path, capsys):
    args = ["--out", str(tmp_path), "--format", "ICFG-PEDES", "--ids", "6", "--images_per_id", "1", "--seed", "1"]
    assert main(args) == 0
    assert main(args) == 1 and "--force" in capsys.readouterr().err
    assert main(args + ["--force"]) == 0
    assert main(args + ["--force", "--size", "64by128"]) == 2
    assert main(["--out", str(tmp_path / "x"), "--format", "CUHK-PEDES", "--ids", "2"]) == 1  # too few for 3 splits


def test_force_replaces_the_folder_whole_and_never_writes_through_a_planted_link(tmp_path):
    args = ["--out", str(tmp_path), "--format", "ICFG-PEDES", "--ids", "6", "--images_per_id", "1", "--seed", "1"]
    assert main(args) == 0
    victim = tmp_path / "victim.json"
    victim.write_text("keep me")
    annotation = tmp_path / "ICFG-PEDES" / "ICFG_PEDES.json"
    expected = annotation.read_bytes()
    annotation.unlink()
    annotation.symlink_to(victim)
    (tmp_path / ".ICFG-PEDES.tmp-k3j_9zq1").mkdir()  # left by a killed generation
    assert main(args + ["--force"]) == 0
    assert victim.read_text() == "keep me"
    assert not annotation.is_symlink() and annotation.read_bytes() == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ICFG-PEDES", "victim.json"]
