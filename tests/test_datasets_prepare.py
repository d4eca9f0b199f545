"""data.sh end to end on each format; every bad input stops with its message and leaves earlier output intact."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from datasets import BENCHMARKS, prepare
from tests.messy_data import make_dataset, make_messy_copy, read_annotation, write_annotation
from utils import files

REPO = Path(__file__).resolve().parents[1]
NAMES = list(BENCHMARKS)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """Pristine generated datasets (24 ids x 3 images: enough images for the parallel checker)."""
    root = tmp_path_factory.mktemp("clean")
    return {name: make_dataset(root, name, ids=24, images_per_id=3, seed=1) for name in NAMES}


def snapshot(folder: Path) -> dict:
    """Every file under `folder` with its bytes and mtime."""
    return {p.relative_to(folder): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def run_main(args, capsys):
    """prepare.main in-process: (exit code, stdout, the error paragraph)."""
    code = prepare.main([str(a) for a in args])
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("data.sh: error:")]
    return code, out, errors


@pytest.mark.parametrize("name", NAMES)
def test_data_sh_end_to_end(clean, tmp_path, name):
    root = clean[name].parent
    env = {**os.environ, "PYTHON": sys.executable}
    cmd = ["bash", str(REPO / "data.sh"), str(root), name, "--workers", "2"]
    first = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    out_dir = tmp_path / "processed_data" / name
    bench = BENCHMARKS[name]
    expected = {f"{s}_reid.json" for s in bench.splits} | {"meta.json"}
    assert {p.name for p in out_dir.iterdir()} == expected

    annotation, raw = read_annotation(clean[name])
    meta = json.loads((out_dir / "meta.json").read_text())
    assert meta["annotation"]["sha256"] == hashlib.sha256(annotation.read_bytes()).hexdigest()
    assert Path(meta["image_root"]).is_absolute() and Path(meta["image_root"]) == (clean[name] / "imgs").resolve()
    for split in bench.splits:
        rows = [r for r in raw if r["split"] == split]
        assert meta["splits"][split] == {"ids": len({r["id"] for r in rows}), "images": len(rows),
                                         "captions": sum(len(r["captions"]) for r in rows)}
        records = json.loads((out_dir / f"{split}_reid.json").read_text())
        assert [(r["pid"], r["image"], r["captions"]) for r in records] == \
               [(r["id"], r[bench.image_key], r["captions"]) for r in rows]
        assert all((Path(meta["image_root"]) / r["image"]).is_file() for r in records)

    before = snapshot(out_dir)
    second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0 and "up to date" in second.stdout
    assert snapshot(out_dir) == before


def test_usage_without_arguments_exits_non_zero():
    result = subprocess.run(["bash", str(REPO / "data.sh")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "usage: bash data.sh <dataset_root>" in result.stderr


@pytest.fixture
def workspace(clean, tmp_path, capsys):
    """A private copy of the clean CUHK-PEDES and a first, successful output from it."""
    root = tmp_path / "raw"
    shutil.copytree(clean["CUHK-PEDES"], root / "CUHK-PEDES")
    out = tmp_path / "processed_data"
    code, _, errors = run_main([root, "CUHK-PEDES", "--out", out, "--workers", "1"], capsys)
    assert code == 0, errors
    return root / "CUHK-PEDES", out


def _edit_records(dataset_dir, edit):
    path, records = read_annotation(dataset_dir)
    edit(records)
    write_annotation(path, records)


def _break_json(d):
    path = d / "reid_raw.json"
    lines = path.read_text().splitlines()
    lines[2] = lines[2][:-1]  # drop the comma closing record 1 (line 3)
    path.write_text("\n".join(lines))


def _garbage_image(d):
    _, records = read_annotation(d)
    (d / "imgs" / records[2]["file_path"]).write_bytes(b"this is not an image")


def _truncate_jpeg(d):
    _, records = read_annotation(d)
    jpg = next(r["file_path"] for r in records if r["file_path"].endswith(".jpg"))
    data = (d / "imgs" / jpg).read_bytes()
    (d / "imgs" / jpg).write_bytes(data[: len(data) // 3])


def _conflicting_duplicate(records):
    records.append(dict(records[0], id=records[0]["id"] + 1000))


BAD_INPUTS = {
    "json syntax": (_break_json, "line 4, column 1"),
    "missing key": (lambda d: _edit_records(d, lambda r: r[3].pop("file_path")), "record 3 lacks key 'file_path'"),
    "missing image": (lambda d: (d / "imgs" / read_annotation(d)[1][5]["file_path"]).unlink(), ": missing"),
    "truncated jpeg": (_truncate_jpeg, "image file is truncated"),
    "not an image": (_garbage_image, "does not decode (UnidentifiedImageError"),
    "conflicting duplicate": (lambda d: _edit_records(d, _conflicting_duplicate), "both use image"),
    "no test split": (lambda d: _edit_records(d, lambda rs: [r.update(split="train") for r in rs]),
                      "no usable 'test' records"),
    "no image folder": (lambda d: shutil.rmtree(d / "imgs"), "image folder"),
    "no annotation": (lambda d: (d / "reid_raw.json").unlink(), "no reid_raw.json"),
    "nul byte in an image path": (lambda d: _edit_records(d, lambda r: r[2].update(file_path="cam_a/x\x00.jpg")),
                                  "record 2 key 'file_path' ('cam_a/x\\x00.jpg') holds a NUL byte"),
    "deeply nested json": (lambda d: (d / "reid_raw.json").write_text("[" * 100_000 + "]" * 100_000),
                           "reid_raw.json: nested"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_its_message_and_keeps_earlier_output(workspace, capsys, case):
    dataset_dir, out = workspace
    before = snapshot(out)
    damage, message = BAD_INPUTS[case]
    damage(dataset_dir)
    code = prepare.main([str(dataset_dir.parent), "CUHK-PEDES", "--out", str(out), "--workers", "1"])
    stdout, stderr = capsys.readouterr()
    errors = [line for line in stderr.splitlines() if line.strip() and "checking images" not in line]  # no bars
    assert code == 1 and len(errors) == 1 and errors[0].startswith("data.sh: error:"), (stdout, stderr)
    assert message in errors[0] and "Nothing was written" in errors[0]
    assert snapshot(out) == before
    assert sorted(p.name for p in out.iterdir()) == ["CUHK-PEDES"]  # no temp folders left behind


def test_missing_root_is_an_error(tmp_path, capsys):
    code, _, errors = run_main([tmp_path / "nowhere", "all"], capsys)
    assert code == 1 and "is not a folder" in errors[0]
    code, _, errors = run_main([tmp_path, "all"], capsys)
    assert code == 1 and "no benchmark found" in errors[0]


def test_changed_input_is_rebuilt(workspace, capsys):
    dataset_dir, out = workspace
    _edit_records(dataset_dir, lambda r: r[0]["captions"].__setitem__(0, "A changed caption."))
    code, stdout, _ = run_main([dataset_dir.parent, "CUHK-PEDES", "--out", out, "--workers", "1"], capsys)
    assert code == 0 and "up to date" not in stdout
    assert json.loads((out / "CUHK-PEDES" / "train_reid.json").read_text())[0]["captions"][0] == "A changed caption."
    # an image rewritten in place (same annotation) also counts as changed input
    image = dataset_dir / "imgs" / read_annotation(dataset_dir)[1][1]["file_path"]
    Image.new("RGB", (30, 60), "red").save(image, format=Image.open(image).format)
    code, stdout, _ = run_main([dataset_dir.parent, "CUHK-PEDES", "--out", out, "--workers", "1"], capsys)
    assert code == 0 and "up to date" not in stdout and "wrote" in stdout


def test_failed_write_keeps_previous_output(workspace, capsys, monkeypatch):
    dataset_dir, out = workspace
    before = snapshot(out)
    _edit_records(dataset_dir, lambda r: r[0]["captions"].__setitem__(0, "A changed caption."))

    def fail(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prepare.os, "fsync", fail)
    code, _, errors = run_main([dataset_dir.parent, "CUHK-PEDES", "--out", out, "--workers", "1"], capsys)
    assert code == 1 and "No space left on device" in errors[0] and "previous contents are kept" in errors[0]
    assert snapshot(out) == before and sorted(p.name for p in out.iterdir()) == ["CUHK-PEDES"]


@pytest.mark.parametrize("mechanism", ["exchange", "fallback"])
def test_failed_swap_restores_previous_output(tmp_path, monkeypatch, mechanism):
    out_dir = tmp_path / "out" / "X"
    prepare.write_atomically(out_dir, {"a.json": b"old"})
    if mechanism == "exchange":  # the one atomic rename-exchange fails: nothing moved
        def exchange(first, second):
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(files, "exchange", exchange)
    else:  # no rename-exchange on this file system: two renames, the second fails
        monkeypatch.setattr(files, "exchange", lambda first, second: False)
        real_rename, calls = os.rename, []

        def rename(src, dst):
            calls.append(dst)
            if len(calls) == 2:  # the temp folder moving into place
                raise OSError(5, "Input/output error")
            real_rename(src, dst)

        monkeypatch.setattr(prepare.os, "rename", rename)
    with pytest.raises(OSError):
        prepare.write_atomically(out_dir, {"a.json": b"new"})
    assert (out_dir / "a.json").read_bytes() == b"old"
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["X"]


class Killed(BaseException):
    """A kill: like SIGKILL, nothing after it runs (every later removal raises it too, so no clean-up happens)."""


def _first_caption(out):
    return json.loads((out / "CUHK-PEDES" / "train_reid.json").read_text())[0]["captions"][0]


def _assert_complete(out_dir):
    """out_dir is a finished data.sh output: meta.json and every file it lists, with the recorded digests."""
    meta = json.loads((out_dir / "meta.json").read_text())
    assert {p.name for p in out_dir.iterdir()} == set(meta["outputs"]) | {"meta.json"}
    assert all(hashlib.sha256((out_dir / n).read_bytes()).hexdigest() == sha for n, sha in meta["outputs"].items())


def test_a_kill_right_after_the_first_step_of_the_swap_leaves_a_complete_output_and_the_next_run_cleans_up(
        workspace, capsys, monkeypatch):
    """Killed right after the swap's first step (the rename-exchange; two renames used to leave the name missing
    here): processed_data/CUHK-PEDES is the complete new output, and the next run removes the previous one."""
    dataset_dir, out = workspace
    old_caption = _first_caption(out)
    _edit_records(dataset_dir, lambda r: r[0]["captions"].__setitem__(0, "A changed caption."))
    real_rename, real_exchange = os.rename, files.exchange

    def rename_then_die(src, dst):
        real_rename(src, dst)
        raise Killed

    def exchange_then_die(first, second):
        if real_exchange(first, second):
            raise Killed
        return False

    def killed(*_args, **_kwargs):
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(files.os, "rename", rename_then_die)
        patch.setattr(files, "exchange", exchange_then_die)
        patch.setattr(files.shutil, "rmtree", killed)  # no clean-up after the kill
        with pytest.raises(Killed):
            prepare.main([str(dataset_dir.parent), "CUHK-PEDES", "--out", str(out), "--workers", "1"])
    capsys.readouterr()
    assert (out / "CUHK-PEDES").is_dir(), sorted(p.name for p in out.iterdir())
    _assert_complete(out / "CUHK-PEDES")
    assert _first_caption(out) == "A changed caption." != old_caption
    assert len(list(out.iterdir())) == 2  # plus the previous output under a stale name
    code, stdout, _ = run_main([dataset_dir.parent, "CUHK-PEDES", "--out", out, "--workers", "1", "--force"], capsys)
    assert code == 0 and "left by an interrupted earlier run" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["CUHK-PEDES"]
    _assert_complete(out / "CUHK-PEDES")


def test_a_kill_between_the_fallbacks_two_renames_is_undone_by_the_next_run_even_a_failing_one(workspace, capsys,
                                                                                               monkeypatch):
    """Without a rename-exchange (some file systems) the swap is two renames; a kill between them leaves the
    previous output moved aside, and the next run puts it back first, whatever happens later in that run."""
    dataset_dir, out = workspace
    before = snapshot(out / "CUHK-PEDES")
    _edit_records(dataset_dir, lambda r: r[0]["captions"].__setitem__(0, "A changed caption."))
    real_rename, renames = os.rename, []

    def rename_then_die(src, dst):
        renames.append(dst)
        if len(renames) == 2:
            raise Killed
        real_rename(src, dst)

    def killed(*_args, **_kwargs):
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(files, "exchange", lambda first, second: False)
        patch.setattr(files.os, "rename", rename_then_die)
        patch.setattr(files.shutil, "rmtree", killed)
        with pytest.raises(Killed):
            prepare.main([str(dataset_dir.parent), "CUHK-PEDES", "--out", str(out), "--workers", "1"])
    capsys.readouterr()
    assert not (out / "CUHK-PEDES").exists()  # the fallback's window, closed by the next run
    annotation = (dataset_dir / "reid_raw.json").read_bytes()
    _break_json(dataset_dir)
    code, stdout, errors = run_main([dataset_dir.parent, "CUHK-PEDES", "--out", out, "--workers", "1"], capsys)
    assert code == 1 and "restored" in stdout and len(errors) == 1
    assert snapshot(out / "CUHK-PEDES") == before  # the previous output is back, unchanged, though this run failed
    (dataset_dir / "reid_raw.json").write_bytes(annotation)
    code, stdout, _ = run_main([dataset_dir.parent, "CUHK-PEDES", "--out", out, "--workers", "1"], capsys)
    assert code == 0 and "left by an interrupted earlier run" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["CUHK-PEDES"] and _first_caption(out) == "A changed caption."
    _assert_complete(out / "CUHK-PEDES")


def test_messy_copy_is_cleaned_and_reported(clean, tmp_path, capsys):
    for name in NAMES:
        mess = make_messy_copy(clean[name], tmp_path / "raw" / name, bad_images=False)
        out = tmp_path / "processed_data"
        code, stdout, errors = run_main([tmp_path / "raw", name, "--out", out, "--workers", "1"], capsys)
        assert code == 0, errors
        for text in ["id(s) were strings", "empty or whitespace-only caption", "record(s) left with no caption",
                     "exact duplicate record", "non-RGB images", "smaller than 16 px"]:
            assert text in stdout, (name, text, stdout)
        _, raw = read_annotation(mess.dataset_dir)
        train = {r["image"]: r for r in json.loads((out / name / "train_reid.json").read_text())}
        key = mess.image_key
        html_caption = train[raw[mess.html_record][key]]["captions"][0]
        assert html_caption == "The woman's coat is \"red\" & long\u2014really \u201clong\u201d."
        assert len(train[raw[mess.long_record][key]]["captions"][0].split()) > 100  # kept; the tokenizer truncates
        assert train[raw[mess.empty_caption_record][key]]["captions"] == raw[mess.empty_caption_record]["captions"][:-1]
        assert raw[mess.blank_record][key] not in train
        assert all(train[raw[i][key]]["pid"] == int(raw[i]["id"]) for i in mess.string_id_records)
        assert all(m in ("L", "P", "RGBA", "CMYK") and raw_path in train for m, raw_path in mess.modes.items())
        meta = json.loads((out / name / "meta.json").read_text())
        assert meta["dropped"] == {"empty_captions": 3, "captionless_records": 1, "duplicate_records": 1,
                                   "bad_images": []}


def test_bad_images_stop_the_run_unless_skipped(clean, tmp_path, capsys):
    mess = make_messy_copy(clean["RSTPReid"], tmp_path / "raw" / "RSTPReid")
    out = tmp_path / "processed_data"
    code, _, errors = run_main([tmp_path / "raw", "all", "--out", out, "--workers", "1"], capsys)
    assert code == 1 and "2 of" in errors[0]
    assert f"imgs/{mess.missing_image}: missing" in errors[0]
    assert f"imgs/{mess.truncated_image}: does not decode" in errors[0]
    assert "--skip_bad_images" in errors[0] and not out.exists()

    code, stdout, _ = run_main([tmp_path / "raw", "all", "--out", out, "--workers", "1", "--skip_bad_images"], capsys)
    assert code == 0 and "--skip_bad_images dropped 2 record(s)" in stdout
    assert "not found under" in stdout and "CUHK-PEDES" in stdout  # `all` says which benchmarks are absent
    meta = json.loads((out / "RSTPReid" / "meta.json").read_text())
    assert meta["dropped"]["bad_images"] == sorted([mess.missing_image, mess.truncated_image])
    test_images = {r["image"] for r in json.loads((out / "RSTPReid" / "test_reid.json").read_text())}
    assert mess.missing_image not in test_images and mess.truncated_image not in test_images


def test_folders_left_by_a_killed_run_are_removed_at_the_next_run(workspace, capsys):
    dataset_dir, out = workspace
    stale = [out / ".CUHK-PEDES.tmp-ab12cd_3", out / ".CUHK-PEDES.old-zz99yy00"]
    for folder in stale:
        (folder / "previous").mkdir(parents=True)
        (folder / "previous" / "meta.json").write_text("{}")
    unrelated = out / ".RSTPReid.tmp-ab12cd_3"
    unrelated.mkdir()
    code, stdout, _ = run_main([dataset_dir.parent, "CUHK-PEDES", "--out", out, "--workers", "1"], capsys)
    assert code == 0 and "left by an interrupted earlier run" in stdout
    assert not any(folder.exists() for folder in stale) and unrelated.is_dir()


def test_nested_files_are_written_in_the_fresh_folder(tmp_path):
    prepare.write_atomically(tmp_path / "X", {"a.json": b"1", "imgs/b/c.png": b"2"})
    assert (tmp_path / "X" / "imgs" / "b" / "c.png").read_bytes() == b"2"
    assert [p.name for p in tmp_path.iterdir()] == ["X"]
