"""search.py and its modules: exact chunked top-k, the photo folder scan, the index file, the CLI, test.py parity."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import search
from datasets.build import build_eval_data
from datasets.processed import load_split
from datasets.transforms import ResizeToUint8
from evaluation.encode import encode_split
from models.cfine import retrieval_features
from models.checkpoint import load_model, save_checkpoint
from retrieval import index as search_index
from retrieval.image_folder import ImageFiles, scan_image_folder
from retrieval.index import SearchIndexError, gather_rows, open_for_update, read_index, write_index
from retrieval.ranking import top_k
from tests.tolerance import assert_close
from utils.errors import run_main

pytestmark = pytest.mark.usefixtures("single_thread")


def run_search(*argv) -> int:
    return search.main(search.get_args_parser().parse_args([str(a) for a in argv]))


def build(checkpoint, photos, out):
    return run_search("index", "--checkpoint", checkpoint, "--images", photos, "--out", out, "--device", "cpu",
                      "--workers", "0", "--no_progress")


# --- retrieval/ranking.py ---------------------------------------------------------------------------------

def test_top_k_is_the_stable_descending_sort_across_chunks_and_blocks():
    # Integer features in [-8, 8]: every product and partial sum is an integer below 2^24, exact in fp32 in any
    # summation order, so equal scores are bit-equal on any CPU and kernel (MKL's AVX2 and AVX-512 paths sum a
    # product in another order per block, so random features would tie on one CPU only). Small integers also tie
    # often: the top 40 hold dozens of ties, many across chunk and block boundaries.
    g = torch.Generator().manual_seed(0)
    gallery = torch.randint(-8, 9, (3000, 48), generator=g).half()
    gallery[2999] = gallery[5] = gallery[1700]  # exact ties across chunks and blocks
    gallery[10], gallery[11] = 0.0, -0.0  # zero rows score +0.0 or -0.0 (the kernel's choice): they must tie too
    queries = torch.randint(-8, 9, (6, 48), generator=g).float()
    queries[0] = gallery[1700].float()
    queries[1] = -queries[2]  # negative scores for the mirrored query
    scores = queries @ gallery.float().T
    expected = torch.sort(scores, dim=1, descending=True, stable=True)
    for chunk_rows, block_rows in ((64, 256), (1000, 1000), (4096, 1 << 16)):
        best = top_k(queries, gallery, 40, chunk_rows=chunk_rows, block_rows=block_rows)
        assert torch.equal(best.indices, expected.indices[:, :40])
        assert torch.equal(best.scores, expected.values[:, :40])
    assert best.indices[0, :3].tolist() == [5, 1700, 2999]
    everything = top_k(queries, gallery.numpy(), 5000, chunk_rows=128, block_rows=512)  # k > N: all, in order
    assert torch.equal(everything.indices, expected.indices)
    with pytest.raises(ValueError, match="empty"):
        top_k(queries, gallery[:0], 3)


def test_top_k_reads_a_memory_mapped_npy(tmp_path):
    features = torch.nn.functional.normalize(torch.randn(500, 32), dim=1).half().numpy()
    np.save(tmp_path / "f.npy", features)
    mapped = np.load(tmp_path / "f.npy", mmap_mode="c")
    query = torch.randn(2, 32)
    assert torch.equal(top_k(query, mapped, 7, chunk_rows=50).indices, top_k(query, torch.from_numpy(features), 7).indices)


# --- retrieval/image_folder.py ------------------------------------------------------------------------------------

def test_scan_finds_images_by_suffix_and_leaves_out_links_leading_outside(tmp_path):
    photos, outside = tmp_path / "photos", tmp_path / "outside"
    (photos / "a" / "b").mkdir(parents=True)
    outside.mkdir()
    for name in ("x.JPG", "a/y.png", "a/b/z.webp", "a/b/w.Jpeg", "v.bmp"):
        Image.new("RGB", (4, 8)).save(photos / name, format={"jpg": "JPEG", "jpeg": "JPEG"}.get(
            name.rsplit(".", 1)[1].lower(), name.rsplit(".", 1)[1].upper()))
    (photos / "notes.txt").write_text("not an image")
    Image.new("RGB", (4, 8)).save(outside / "secret.png")
    os.symlink(outside / "secret.png", photos / "escape.png")
    os.symlink(photos / "x.JPG", photos / "a" / "inside.jpg")
    os.symlink(photos / "missing.png", photos / "dangling.png")
    os.symlink(outside, photos / "linked_folder")  # not followed
    images, left_out = scan_image_folder(photos)
    assert [i.path for i in images] == ["a/b/w.Jpeg", "a/b/z.webp", "a/inside.jpg", "a/y.png", "v.bmp", "x.JPG"]
    assert left_out == ["dangling.png", "escape.png"]
    assert images[-1].size == (photos / "x.JPG").stat().st_size


def test_unreadable_image_gives_its_reason_instead_of_failing(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    Image.new("RGB", (4, 8)).save(tmp_path / "good.png")
    files = ImageFiles([str(tmp_path / "bad.jpg"), str(tmp_path / "good.png")], ResizeToUint8((8, 4)))
    assert "UnidentifiedImageError" in files[0][1]
    assert files[1][1].shape == (3, 8, 4)


# --- retrieval/index.py ---------------------------------------------------------------------------------------

def test_index_round_trip_is_memory_mapped_and_rewrites_atomically(tmp_path, monkeypatch):
    photos, index = tmp_path / "photos", tmp_path / "index"
    photos.mkdir()
    for name in ("b.png", "a.png"):
        Image.new("RGB", (4, 8)).save(photos / name)
    images, _ = scan_image_folder(photos)
    identity = {"path": "ck.pt", "sha256": "ab" * 32}
    features = np.arange(2 * 6, dtype=np.float16).reshape(2, 6)
    write_index(index, photos, identity, images, 6, [features])
    loaded = read_index(index)
    assert isinstance(loaded.features, np.memmap) and np.array_equal(loaded.features, features)
    assert loaded.images == images and loaded.checkpoint == identity
    assert json.loads((index / "manifest.json").read_text())["images"][0][0] == "a.png"

    def disk_full(f, blocks, rows, dim):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(search_index, "_write_npy", disk_full)
    with pytest.raises(SearchIndexError, match="could not be written.*previous index there.*unchanged"):
        write_index(index, photos, identity, images, 6, [features + 1])
    monkeypatch.undo()
    assert np.array_equal(read_index(index).features, features)
    assert sorted(p.name for p in index.iterdir()) == [Path(loaded.features.filename).name, "manifest.json"]
    # What a killed rewrite leaves (atomic_write's temporary files, a features file the manifest never named) goes
    # with the next rewrite.
    for name in (".manifest.json.abcd1234.tmp", ".features-0123456789ab.npy.x1y2z3w4.tmp", "features-0123456789ab.npy"):
        (index / name).write_bytes(b"left by a kill")
    write_index(index, photos, identity, images, 6, [features + 2])
    rewritten = read_index(index)
    assert np.array_equal(rewritten.features, features + 2)
    assert sorted(p.name for p in index.iterdir()) == [Path(rewritten.features.filename).name, "manifest.json"]

    other = {"path": "other.pt", "sha256": "cd" * 32}
    with pytest.raises(SearchIndexError, match="another checkpoint.*pass another --out.*or delete"):
        open_for_update(index, photos, other)
    with pytest.raises(SearchIndexError, match="indexes the folder.*pass another --out"):
        open_for_update(index, tmp_path, identity)
    os.symlink(index, tmp_path / "link")
    with pytest.raises(SearchIndexError, match="symbolic link"):
        read_index(tmp_path / "link")
    (tmp_path / "not_index").mkdir()
    (tmp_path / "not_index" / "keep.txt").write_text("mine")
    with pytest.raises(SearchIndexError, match="not a search index.*another --out"):
        open_for_update(tmp_path / "not_index", photos, identity)
    (index / "manifest.json").write_text("{broken")
    with pytest.raises(SearchIndexError, match="unreadable.*delete it and rebuild"):
        read_index(index)


def test_gather_rows_takes_each_row_from_its_part():
    old, new = np.arange(12, dtype=np.float16).reshape(4, 3), -np.arange(6, dtype=np.float16).reshape(2, 3)
    blocks = list(gather_rows([old, new], np.array([0, 1, 0, 1, 0]), np.array([3, 1, 0, 0, 2]), block=2))
    assert [len(b) for b in blocks] == [2, 2, 1]
    assert np.array_equal(np.concatenate(blocks), np.stack([old[3], new[1], old[0], new[0], old[2]]))


# --- search.py ---------------------------------------------------------------------------------------------------

def test_cli_errors_are_one_line_and_exit_status_1(tmp_path, capsys):
    """search.py's entry (utils/errors.run_main) turns the retrieval errors into their message and status 1."""
    for argv, message in ((["query", "--index", tmp_path / "none", "someone", "--device", "cpu"],
                           f"{tmp_path / 'none'} does not exist: build one with `python search.py index"),
                          (["query", "--index", tmp_path / "none", "  ", "--device", "cpu"], "a SENTENCE is empty"),
                          (["index", "--checkpoint", tmp_path / "ck.pt", "--images", tmp_path / "photos", "--device",
                            "cpu"], f"--images {tmp_path / 'photos'}: no such folder")):
        assert run_main(search.main, search.get_args_parser().parse_args([str(a) for a in argv])) == 1
        error = capsys.readouterr().err
        assert message in error and error.count("\n") == 1 and "Traceback" not in error


def test_index_updates_only_what_changed_and_query_prints_rankings(tiny_checkpoint, test_split_photos, tmp_path,
                                                                     capsys):
    photos, index = tmp_path / "photos", tmp_path / "index"
    shutil.copytree(test_split_photos, photos)
    assert build(tiny_checkpoint, photos, index) == 0
    first = read_index(index)
    rows = {image.path: np.array(first.features[r]) for r, image in enumerate(first.images)}
    assert "12 images" in capsys.readouterr().out

    removed, changed = first.images[0].path, first.images[1].path
    (photos / removed).unlink()
    with Image.open(photos / changed) as image:
        image.transpose(Image.FLIP_LEFT_RIGHT).save(photos / changed)
    shutil.copy(photos / first.images[2].path, photos / "new copy.png")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    (tmp_path / "elsewhere.png").write_bytes((photos / first.images[2].path).read_bytes())
    os.symlink(tmp_path / "elsewhere.png", photos / "escape.png")
    assert build(tiny_checkpoint, photos, index) == 0
    out = capsys.readouterr().out
    assert "12 images" in out and "encoded 2 new or changed, reused 10, removed 1 no longer there" in out
    assert "1 unreadable image(s) skipped" in out and "broken.jpg" in out
    assert "1 link(s) left out" in out and "escape.png" in out
    second = read_index(index)
    paths = [image.path for image in second.images]
    assert removed not in paths and "new copy.png" in paths and "broken.jpg" not in paths
    for row, image in enumerate(second.images):
        if image.path in rows and image.path != changed:
            assert np.array_equal(second.features[row], rows[image.path])  # reused, not re-encoded
    assert not np.array_equal(second.features[paths.index(changed)], rows[changed])
    # Re-encoded in another batch: its fp32 features may round to the neighbouring fp16 value, one fp16 step being
    # at most 2^-10 of the largest entry.
    assert_close(second.features[paths.index("new copy.png")], rows[first.images[2].path], 2**-10)

    other = tmp_path / "other.pt"
    state = torch.load(tiny_checkpoint, weights_only=True)
    state["epoch"] = 99
    save_checkpoint({k: v for k, v in state.items() if k != "format"}, other)
    with pytest.raises(SearchIndexError, match="another checkpoint.*another --out.*delete"):
        build(other, photos, index)

    long_sentence = " ".join(["a woman in a long red coat carrying a black bag"] * 12)
    with pytest.warns(UserWarning, match="truncated"):
        assert run_search("query", "--index", index, "--device", "cpu", "--top_k", "3", "--json",
                          "--page", tmp_path / "page.png", "a man in a blue shirt", long_sentence) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["query"] for line in lines] == ["a man in a blue shirt", long_sentence]
    assert [r["rank"] for r in lines[0]["results"]] == [1, 2, 3]
    assert all(r["path"] in paths and os.path.isfile(r["file"]) for line in lines for r in line["results"])
    scores = [r["score"] for r in lines[0]["results"]]
    assert scores == sorted(scores, reverse=True)
    with Image.open(tmp_path / "page.png") as page:
        assert page.width > 3 * 96
    assert (tmp_path / "page-2.png").is_file()
    assert run_search("query", "--index", index, "--device", "cpu", "--top_k", "3", "--json", "--threads", "2",
                      "a man in a blue shirt") == 0
    alone = json.loads(capsys.readouterr().out)["results"]  # encoded alone and scanned on two threads
    assert [r["path"] for r in alone] == [r["path"] for r in lines[0]["results"]]
    assert_close([r["score"] for r in alone], scores, 2e-6)  # fp32 roundings of another batch, relative (measured 1.9e-7)
    with pytest.raises(SearchIndexError, match="not the checkpoint.*was built with"):
        run_search("query", "--index", index, "--checkpoint", other, "--device", "cpu", "someone")


def test_search_ranks_a_split_like_test_py(processed_root, tiny_checkpoint, test_split_photos, tmp_path, capsys):
    """search.py's top-10 per caption equals test.py's ranking of the same split, computed with test.py's own
    functions (encode_split, then a stable descending sort as test.py --visualize does), from the gallery
    features rounded to fp16 as the index stores them. Against test.py's unrounded fp32 features the lists may
    differ only where two images' fp32 scores are within the fp16 rounding error (checked below too)."""
    model, state = load_model(tiny_checkpoint, "cpu")
    data = build_eval_data(processed_root / "CUHK-PEDES", "test", image_size=tuple(model.config.clip.vision.image_size),
                           batch_size=128, workers=0, mean_std=state["args"]["mean_std"])
    encoded = encode_split(model, data, torch.device("cpu"), "off", 128, progress=False)
    queries = retrieval_features(encoded.queries, "concat")
    gallery = retrieval_features(encoded.gallery, "concat")
    image_root = load_split(processed_root / "CUHK-PEDES", "test").image_root
    names = [os.path.relpath(p, image_root).replace(os.sep, "/") for p in data.gallery_paths]

    assert build(tiny_checkpoint, test_split_photos, tmp_path / "index") == 0
    stored = read_index(tmp_path / "index")
    order = [names.index(image.path) for image in stored.images]
    assert torch.equal(torch.from_numpy(np.array(stored.features)), gallery[order].half())  # same fp16 features
    capsys.readouterr()
    assert run_search("query", "--index", tmp_path / "index", "--device", "cpu", "--top_k", "10", "--json",
                      *data.query_captions) == 0
    found = [[r["path"] for r in json.loads(line)["results"]] for line in capsys.readouterr().out.splitlines()]
    assert len(found) == len(data.query_captions) == 25

    def test_py_top10(gallery_features):
        scores = queries @ gallery_features.T
        ranked = torch.sort(scores, dim=1, descending=True, stable=True)
        return [[names[i] for i in row[:10]] for row in ranked.indices.tolist()], scores

    expected, _ = test_py_top10(gallery.half().float())
    assert found == expected
    unrounded, scores = test_py_top10(gallery)
    for q, (a, b) in enumerate(zip(found, unrounded)):
        for x, y in zip(a, b):
            if x != y:  # a swap is only allowed between near-equal fp32 scores: for unit features |q||g| = 1, so
                # rounding g to fp16 moves a score by at most 2^-11, and a swap needs scores within 2^-10 < 1e-3
                assert abs(scores[q, names.index(x)] - scores[q, names.index(y)]) < 1e-3
    distinct = torch.sort(scores, dim=1, descending=True).values[:, :10]
    assert (distinct[:, :-1] - distinct[:, 1:]).gt(0).float().mean() > 0.9  # the rankings are not all ties


def test_bert_mode_checkpoint_indexes_and_answers(processed_root, test_split_photos, tmp_path, capsys):
    """A bert-mode checkpoint (768-d in the real model; the tiny BERT here pairs with the 64-wide image tower)."""
    import train
    from tests.bert_fixtures import write_bert_folder
    from tests.conftest import TINY_TRAIN_FLAGS

    bert = write_bert_folder(tmp_path / "bert-tiny")
    run = tmp_path / "bert_run"
    assert train.main(train.parse_args(["--data_root", str(processed_root), "--output_dir", str(run), *TINY_TRAIN_FLAGS,
                                        "--epochs", "1", "--text_encoder", "bert", "--bert", str(bert)])) == 0
    assert build(run / "best.pt", test_split_photos, tmp_path / "index") == 0
    index = read_index(tmp_path / "index")
    assert index.features.shape[1] == 3 * 64
    capsys.readouterr()
    assert run_search("query", "--index", tmp_path / "index", "a man in a red coat", "--top_k", "3", "--json",
                      "--device", "cpu") == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(lines) == 1 and len(lines[0]["results"]) == 3
