"""search.py and its modules: exact chunked top-k, the photo folder scan, the index file, the CLI, test.py parity."""
import json
import os
import shutil
import signal
import subprocess
import sys
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
from retrieval import build_index, search_model
from retrieval import index as search_index
from retrieval.build_index import IndexUpdate
from retrieval.image_folder import ImageFiles, scan_image_folder
from retrieval.index import SearchIndexError, gather_rows, open_for_update, read_index, write_index
from retrieval.ranking import top_k
from retrieval.text_search import load_text_search
from tests.conftest import REPO
from tests.tolerance import assert_close
from utils.errors import run_main
from utils.files import sha256_file

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


# --- nothing lost, never a traceback (issue 20) ----------------------------------------------------------------------

IDENTITY = {"path": "ck.pt", "sha256": "ab" * 32}


def small_index(tmp_path: Path, rows: int = 3) -> tuple[Path, Path, list]:
    """An index of `rows` tiny images written by write_index (no model): (index folder, photo folder, images)."""
    photos, index = tmp_path / "photos", tmp_path / "index"
    photos.mkdir()
    for i in range(rows):
        Image.new("RGB", (4, 8), (i, 0, 0)).save(photos / f"{i}.png")
    images, _ = scan_image_folder(photos)
    write_index(index, photos, IDENTITY, images, 6, [np.arange(rows * 6, dtype=np.float16).reshape(rows, 6) / 32])
    return index, photos, images


def index_files(index: Path) -> list[str]:
    return sorted(p.name for p in index.iterdir())


def committed_files(index: Path) -> list[str]:
    return sorted([json.loads((index / "manifest.json").read_text())["features"], "manifest.json"])


# What a first `search.py index` killed at each point leaves in its --out folder (atomic_write's temporary files are
# .<name>.<8 random characters>.tmp).
FIRST_RUN_LEFTOVERS = {
    "killed writing the features": [".features-0123456789ab.npy.k1ll3d_0.tmp"],
    "killed after the features": ["features-0123456789ab.npy"],
    "killed writing the manifest": ["features-0123456789ab.npy", ".manifest.json.k1ll3d_0.tmp"],
    "killed twice": ["features-0123456789ab.npy", "features-ba9876543210.npy", ".features-ba9876543210.npy.abcdefgh.tmp"],
}


@pytest.mark.parametrize("left", FIRST_RUN_LEFTOVERS.values(), ids=FIRST_RUN_LEFTOVERS.keys())
def test_what_a_killed_first_index_leaves_is_completed_by_the_next_run(tmp_path, left):
    photos, index = tmp_path / "photos", tmp_path / "index"
    photos.mkdir()
    Image.new("RGB", (4, 8)).save(photos / "a.png")
    images, _ = scan_image_folder(photos)
    index.mkdir()
    for name in left:
        (index / name).write_bytes(b"\x93NUMPY left by a kill")
    with pytest.raises(SearchIndexError, match="interrupted `search.py index`.*run it again"):
        read_index(index)  # query/serve say what happened
    assert open_for_update(index, photos, IDENTITY) is None  # index treats it as a new index
    write_index(index, photos, IDENTITY, images, 6, [np.ones((1, 6), np.float16)])
    assert read_index(index).images == images
    assert index_files(index) == committed_files(index)  # the leftovers are gone


@pytest.mark.parametrize("names", [["features-0123456789ab.npy", "notes.txt"], ["features-mine.npy"],
                                   ["features-0123456789ab.npy.bak"]])
def test_a_folder_with_anything_else_is_still_not_taken_over(tmp_path, names):
    photos, index = tmp_path / "photos", tmp_path / "index"
    photos.mkdir()
    index.mkdir()
    for name in names:
        (index / name).write_bytes(b"mine")
    with pytest.raises(SearchIndexError, match="not a search index.*another --out"):
        open_for_update(index, photos, IDENTITY)
    assert index_files(index) == sorted(names)


def test_a_link_named_like_a_leftover_is_not_taken_over(tmp_path):
    photos, index = tmp_path / "photos", tmp_path / "index"
    photos.mkdir()
    index.mkdir()
    (tmp_path / "precious.npy").write_bytes(b"mine")
    os.symlink(tmp_path / "precious.npy", index / "features-0123456789ab.npy")
    with pytest.raises(SearchIndexError, match="not a search index"):
        open_for_update(index, photos, IDENTITY)
    assert (tmp_path / "precious.npy").read_bytes() == b"mine"


# Runs `python search.py ARGS...` with retrieval.index's atomic_write wrapped so that the process SIGKILLs itself at
# POINT: "features" (half-way through writing the features file), "between" (features renamed into place, manifest
# not started) or "manifest" (half-way through writing the manifest).
KILLED_RUN = """
import os, runpy, signal, sys
from retrieval import index

point, real = sys.argv[1], index.atomic_write

def die(f):
    f.write(b"\\x93NUMPY partial")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

def atomic_write(path, write):
    if point == "between" and path.name == "manifest.json":
        os.kill(os.getpid(), signal.SIGKILL)
    if (point == "features" and path.name.startswith("features-")) or (point == "manifest" and path.name == "manifest.json"):
        write = die
    return real(path, write)

index.atomic_write = atomic_write
sys.argv = ["search.py", *sys.argv[2:]]
runpy.run_path("search.py", run_name="__main__")
"""


def killed_index_run(point: str, checkpoint, photos, index) -> list[str]:
    """Run `search.py index` in a subprocess that SIGKILLs itself at point; the names it left in index."""
    argv = ["index", "--checkpoint", checkpoint, "--images", photos, "--out", index, "--device", "cpu", "--workers", "0",
            "--no_progress"]
    result = subprocess.run([sys.executable, "-c", KILLED_RUN, point, *map(str, argv)], cwd=REPO, capture_output=True,
                            text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    return index_files(index)


@pytest.mark.parametrize("point", ["features", "between", "manifest"])
def test_search_py_index_killed_by_sigkill_then_run_again_completes(point, tiny_checkpoint, test_split_photos, tmp_path,
                                                                   capsys):
    index = tmp_path / "index"
    left = killed_index_run(point, tiny_checkpoint, test_split_photos, index)
    assert left and "manifest.json" not in left
    assert build(tiny_checkpoint, test_split_photos, index) == 0
    assert "12 images" in capsys.readouterr().out
    assert len(read_index(index).images) == 12 and index_files(index) == committed_files(index)


def test_a_killed_update_leaves_the_old_index_and_the_next_run_removes_its_files(tiny_checkpoint, test_split_photos,
                                                                                 tmp_path, capsys):
    photos, index = tmp_path / "photos", tmp_path / "index"
    shutil.copytree(test_split_photos, photos)
    assert build(tiny_checkpoint, photos, index) == 0
    before = read_index(index)
    shutil.copy(photos / before.images[0].path, photos / "new.png")
    left = killed_index_run("manifest", tiny_checkpoint, photos, index)
    assert len(left) == 4 and set(committed_files(index)) < set(left)  # a new features file and a manifest temp file
    assert read_index(index).images == before.images  # still the old index, usable
    assert build(tiny_checkpoint, photos, index) == 0
    assert "13 images" in capsys.readouterr().out and index_files(index) == committed_files(index)


NOT_UTF8 = b"caf\xe9 \xff.png"  # Latin-1 bytes: a valid Linux file name, but not UTF-8


def test_a_file_name_that_is_not_utf8_is_indexed_and_found(tiny_checkpoint, test_split_photos, tmp_path, capsys):
    photos, index = tmp_path / "photos", tmp_path / "index"
    shutil.copytree(test_split_photos, photos)
    odd = os.fsdecode(NOT_UTF8)  # how Python spells it: the bytes that are not UTF-8 as surrogates
    shutil.copy(photos / scan_image_folder(photos)[0][0].path, os.path.join(os.fsencode(photos), NOT_UTF8))
    assert build(tiny_checkpoint, photos, index) == 0
    assert "13 images" in capsys.readouterr().out
    (index / "manifest.json").read_bytes().decode("utf-8")  # the manifest stays UTF-8 text
    assert odd in [image.path for image in read_index(index).images]
    assert build(tiny_checkpoint, photos, index) == 0
    assert "encoded 0 new or changed, reused 13" in capsys.readouterr().out  # the name read back is the same name
    assert run_search("query", "--index", index, "--device", "cpu", "--top_k", "13", "--json", "someone") == 0
    results = json.loads(capsys.readouterr().out)["results"]
    found = [r for r in results if r["path"] == odd]
    assert len(found) == 1 and os.fsencode(found[0]["path"]) == NOT_UTF8 and os.path.isfile(found[0]["file"])
    assert run_search("query", "--index", index, "--device", "cpu", "--top_k", "13", "someone") == 0
    assert "caf\\xe9 \\xff.png" in capsys.readouterr().out  # the table shows the bytes that are not UTF-8 as \xNN


def test_an_unreadable_or_not_utf8_name_in_the_summary_is_printable(tmp_path):
    update = IndexUpdate(tmp_path, tmp_path, 0, 0, 0, 0, [os.fsdecode(b"\xff.jpg") + ": broken"], [os.fsdecode(b"\xfe.png")])
    summary = update.summary()
    summary.encode("utf-8")
    assert "\\xff.jpg: broken" in summary and "\\xfe.png" in summary


def _edit(change):
    def edit(manifest: dict) -> str:
        change(manifest)
        return json.dumps(manifest)
    return edit


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def change(manifest):
        target = manifest
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
    return _edit(change)


MANIFEST_DAMAGE = {
    "not JSON": lambda m: "{broken",
    "not UTF-8": lambda m: b"\xff\xfe{}",
    "deeply nested": lambda m: "[" * 100_000 + "]" * 100_000,
    "a list": lambda m: "[]",
    "no images": _edit(lambda m: m.pop("images")),
    "images not a list": _set("images", 5),
    "an image row too short": _set("images", 0, ["0.png", 1]),
    "a path not text": _set("images", 0, 0, 7),
    "a path with a lone surrogate": _set("images", 0, 0, "\ud800.png"),
    "a size not a number": _set("images", 0, 1, "x"),
    "a size that is a bool": _set("images", 0, 1, True),
    "an mtime that is a float": _set("images", 0, 2, 1.5),
    "a path twice": _edit(lambda m: m["images"].__setitem__(1, m["images"][0])),
    "a path leading out": _set("images", 0, 0, "../outside.png"),
    "a path leading out midway": _set("images", 0, 0, "a/../../outside.png"),
    "an absolute path": _set("images", 0, 0, "/etc/passwd"),
    "an empty path": _set("images", 0, 0, ""),
    "a path with a NUL byte": _set("images", 0, 0, "a\0.png"),
    "count differs": _set("count", 5),
    "dim not a number": _set("dim", "six"),
    "dim differs": _set("dim", 7),
    "checkpoint not an object": _set("checkpoint", "ck.pt"),
    "checkpoint without sha256": _set("checkpoint", {"path": "ck.pt"}),
    "checkpoint path not text": _set("checkpoint", "path", 3),
    "image_root not text": _set("image_root", 3),
    "features not text": _set("features", 3),
    "features elsewhere": _set("features", "../features-0123456789ab.npy"),
    "features missing": _set("features", "features-000000000000.npy"),
    "checksum not text": _set("features_sha256", 3),
    "checksum missing": _edit(lambda m: m.pop("features_sha256")),
    "another format": _set("format", "something-else"),
}


@pytest.mark.parametrize("damage", MANIFEST_DAMAGE.values(), ids=MANIFEST_DAMAGE.keys())
def test_a_damaged_manifest_is_a_one_line_error_naming_the_index(tmp_path, damage):
    index, photos, _ = small_index(tmp_path)
    text = damage(json.loads((index / "manifest.json").read_text()))
    (index / "manifest.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    for read in (lambda: read_index(index), lambda: open_for_update(index, photos, IDENTITY)):
        with pytest.raises(SearchIndexError) as caught:
            read()
        message = str(caught.value)
        assert str(index) in message and "rebuild" in message and "\n" not in message, message


def test_names_with_two_dots_inside_are_paths_inside_the_folder(tmp_path):
    index, _, _ = small_index(tmp_path)
    manifest = json.loads((index / "manifest.json").read_text())
    manifest["images"][0][0] = "v1..2/photo..jpg"
    (index / "manifest.json").write_text(json.dumps(manifest))
    assert read_index(index).images[0].path == "v1..2/photo..jpg"


def _damage_features(edit):
    def damage(path: Path):
        data = bytearray(path.read_bytes())
        edit(data, len(data) - 3 * 6 * 2)  # the data's offset: 3 rows x 6 fp16 values after the header
        path.write_bytes(bytes(data))
    return damage


def _put_value(value):
    return _damage_features(lambda data, start: data.__setitem__(slice(start + 8, start + 10),
                                                                 np.array([value], "<f2").tobytes()))


def _record_checksum(features: Path) -> None:
    """Write the features' present SHA256 into the manifest, as a hand edit covering its tracks would."""
    manifest = json.loads((features.parent / "manifest.json").read_text())
    manifest["features_sha256"] = sha256_file(features)
    (features.parent / "manifest.json").write_text(json.dumps(manifest))


FEATURES_DAMAGE = {
    "a NaN": _put_value(np.nan),
    "an infinity": _put_value(-np.inf),
    "a NaN, its checksum updated too": lambda path: (_put_value(np.nan)(path), _record_checksum(path)),
    "an infinity, its checksum updated too": lambda path: (_put_value(np.inf)(path), _record_checksum(path)),
    "a flipped bit": _damage_features(lambda data, start: data.__setitem__(start + 5, data[start + 5] ^ 1)),
    "truncated": lambda path: path.write_bytes(path.read_bytes()[:-7]),
    "empty": lambda path: path.write_bytes(b""),
    "float32": lambda path: np.save(path, np.zeros((3, 6), np.float32)),
    "another shape": lambda path: np.save(path, np.zeros((2, 6), np.float16)),
}


@pytest.mark.parametrize("damage", FEATURES_DAMAGE.values(), ids=FEATURES_DAMAGE.keys())
def test_damaged_features_are_a_one_line_error_naming_the_file(tmp_path, damage):
    """Also a NaN whose checksum was updated by hand: finite rows are checked on every open, not only the SHA256."""
    index, photos, _ = small_index(tmp_path)
    features = index / json.loads((index / "manifest.json").read_text())["features"]
    damage(features)
    for read in (lambda: read_index(index), lambda: open_for_update(index, photos, IDENTITY)):
        with pytest.raises(SearchIndexError) as caught:
            read()
        message = str(caught.value)
        assert str(index) in message and "rebuild" in message and "\n" not in message, message


def test_non_finite_rows_are_found_on_either_side_of_a_block_boundary():
    features = np.zeros((3 * 4096 + 5, 7), np.float16)
    features[100, 1], features[200, 2] = 65504, -6e-8  # the largest and the smallest float16: finite
    assert search_index._first_non_finite_row(features) is None
    assert search_index._first_non_finite_row(features[:0]) is None
    for row, value in ((0, np.nan), (4095, np.inf), (4096, -np.inf), (3 * 4096 + 4, np.nan)):
        damaged = features.copy()
        damaged[row, 6] = value
        damaged[-1, 0] = np.nan  # a later one too: the first is named
        assert search_index._first_non_finite_row(damaged) == row


def test_the_features_checksum_is_recorded_and_a_mismatch_names_the_file(tiny_checkpoint, test_split_photos, tmp_path,
                                                                         capsys):
    index = tmp_path / "index"
    assert build(tiny_checkpoint, test_split_photos, index) == 0
    manifest = json.loads((index / "manifest.json").read_text())
    features = index / manifest["features"]
    assert manifest["features_sha256"] == sha256_file(features)
    with open(features, "r+b") as f:  # one bit of the last value
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0x01]))
    for argv in (["query", "--index", index, "--device", "cpu", "someone"],
                 ["index", "--checkpoint", tiny_checkpoint, "--images", test_split_photos, "--out", index, "--device",
                  "cpu", "--workers", "0", "--no_progress"]):
        capsys.readouterr()
        assert run_main(search.main, search.get_args_parser().parse_args([str(a) for a in argv])) == 1
        error = capsys.readouterr().err
        assert f"{features} does not match the SHA256 recorded in {index / 'manifest.json'}" in error
        assert "rebuild" in error and error.count("\n") == 1
    with pytest.raises(SearchIndexError, match="does not match the SHA256"):
        load_text_search(index, torch.device("cpu"))


def test_an_index_without_a_checksum_is_upgraded_by_index_and_refused_by_query(tmp_path):
    index, photos, images = small_index(tmp_path)
    manifest = json.loads((index / "manifest.json").read_text())
    manifest["format"] = "cfine-search-index-v1"  # written before the checksum existed
    del manifest["features_sha256"]
    (index / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SearchIndexError, match="older search.py.*no checksum.*search.py index"):
        read_index(index)
    old = open_for_update(index, photos, IDENTITY)
    write_index(index, photos, IDENTITY, images, 6, [old.features])
    assert np.array_equal(read_index(index).features, old.features)


def test_non_finite_features_are_never_written(tmp_path):
    index, photos, images = small_index(tmp_path)
    before = index_files(index)
    bad = np.ones((3, 6), np.float16)
    bad[1, 2] = np.nan
    with pytest.raises(SearchIndexError, match="non-finite"):
        write_index(index, photos, IDENTITY, images, 6, [bad])
    assert index_files(index) == before and read_index(index).images == images


def test_images_the_model_gives_non_finite_features_are_skipped_and_listed(tiny_checkpoint, test_split_photos,
                                                                          tmp_path, monkeypatch):
    real = search_model.retrieval_features

    def first_row_nan(encoded, mode):
        features = real(encoded, mode)
        features[0, 0] = float("nan")
        return features

    monkeypatch.setattr(search_model, "retrieval_features", first_row_nan)
    update = build_index.update_index(tiny_checkpoint, test_split_photos, tmp_path / "index", torch.device("cpu"),
                                      workers=0, progress=False)
    assert update.indexed == 11 and len(update.non_finite) == 1
    assert "1 image(s) the model gave non-finite features" in update.summary()
    assert np.isfinite(read_index(tmp_path / "index").features).all()


@pytest.mark.parametrize("argv, error", [
    (["serve", "--index", "x", "--port", "99999"], "argument --port: 99999 is not allowed; port takes an integer from 0 "
                                                   "to 65535"),
    (["serve", "--index", "x", "--port", "²"], "argument --port: invalid literal for int()"),
    (["index", "--checkpoint", "c", "--images", "i", "--workers", "-1"], "argument --workers: -1 is not allowed; workers "
                                                                         "takes an integer >= 0"),
    (["query", "--index", "x", "s", "--device", "mps"], 'argument --device: "mps" is not allowed; device takes cpu, '
                                                        "cuda or cuda:N"),
    (["query", "--index", "x", "s", "--top_k", "9" * 4401], "argument --top_k: Exceeds the limit"),
    (["query", "--index", "x", "s", "--threads", "0"], "argument --threads: 0 is not allowed"),
])
def test_bad_flags_are_one_line_argparse_errors(argv, error, capsys):
    with pytest.raises(SystemExit) as stop:
        search.get_args_parser().parse_args(argv)
    lines = capsys.readouterr().err.splitlines()
    assert stop.value.code == 2 and error in lines[-1] and lines[-1].count("error:") == 1
    assert not any("Traceback" in line for line in lines) and lines[0].startswith("usage:")


@pytest.mark.parametrize("command", [["index", "--checkpoint", "ck.pt", "--images", "photos", "--out", "idx"],
                                     ["query", "--index", "idx", "someone"], ["serve", "--index", "idx"]])
def test_a_gpu_this_machine_lacks_is_one_line_for_every_command(command, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a CPU-only machine, with or without a GPU
    monkeypatch.chdir(tmp_path)
    args = search.get_args_parser().parse_args([*command, "--device", "cuda:0"])
    assert run_main(search.main, args) == 1
    captured = capsys.readouterr()
    assert captured.err == "--device cuda:0 was requested but no CUDA GPU is visible; use --device cpu\n"
    assert not list(tmp_path.iterdir())  # refused before anything was read or written
