"""test.py: it evaluates a moved copy of the run's data but refuses other data, checks its output folder before
evaluating, records the machine, and never writes through a link planted in its output folder; checkpoints changed
after saving, or without the settings of their run, and --dataset values that are not a benchmark are one line;
--save_features writes what was ranked, in dataset order, atomically."""
import json
import shutil

import numpy as np
import pytest
import torch

import test as evaluate_script
from datasets.processed import load_split
from engine.environment import cpu_model
from evaluation.feature_file import FEATURE_KEYS
from evaluation.metrics import evaluate_retrieval
from models.checkpoint import load_checkpoint, load_model, save_checkpoint
from tests.conftest import moved_copy
from tests.test_models_checkpoint import change_a_weight
from utils.errors import CFineError

pytestmark = pytest.mark.usefixtures("module_single_thread")


def test_test_py_checks_the_data_but_evaluates_a_moved_copy(processed_root, tiny_checkpoint, tmp_path):
    other = moved_copy(processed_root, tmp_path / "x", lambda m: m["splits"]["test"].update(images=1))
    args = evaluate_script.get_args_parser().parse_args(
        ["--checkpoint", str(tiny_checkpoint), "--data_root", str(other), "--workers", "0", "--no_progress",
         "--device", "cpu", "--output_dir", str(tmp_path / "eval")])
    with pytest.raises(CFineError, match="is not the data .*best.pt was trained on"):
        evaluate_script.main(args)
    args.data_root = str(moved_copy(processed_root, tmp_path))
    assert evaluate_script.main(args) == 0
    machine = json.loads((tmp_path / "eval" / "metrics.json").read_text())["machine"]  # what CPU timings depend on
    assert machine == {"device": "cpu", "gpu": None, "cpu_model": cpu_model(), "intra_op_threads": torch.get_num_threads(),
                       "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def test_test_py_checks_its_output_folder_before_evaluating(tiny_checkpoint, tmp_path, monkeypatch):
    (tmp_path / "taken").write_text("a file, not a folder")
    monkeypatch.setattr(evaluate_script, "encode_split", lambda *a, **k: pytest.fail("evaluated first"))
    args = evaluate_script.get_args_parser().parse_args(
        ["--checkpoint", str(tiny_checkpoint), "--output_dir", str(tmp_path / "taken"), "--device", "cpu"])
    with pytest.raises(CFineError, match="--output_dir .*taken: cannot write there"):
        evaluate_script.main(args)


def test_visualize_never_writes_through_a_link_planted_in_the_output_folder(tiny_checkpoint, tmp_path):
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"not to be touched")
    pages = tmp_path / "eval" / "visualize"
    pages.mkdir(parents=True)
    (pages / "query_000.png").symlink_to(victim)
    (tmp_path / "eval" / "metrics.json").symlink_to(victim)
    args = evaluate_script.get_args_parser().parse_args(
        ["--checkpoint", str(tiny_checkpoint), "--output_dir", str(tmp_path / "eval"), "--visualize", "1",
         "--workers", "0", "--no_progress", "--device", "cpu"])
    assert evaluate_script.main(args) == 0
    assert victim.read_bytes() == b"not to be touched"
    assert not (pages / "query_000.png").is_symlink() and (pages / "query_000.png").stat().st_size > 1000
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["split"] == "test"


def eval_args(checkpoint, *extra):
    return evaluate_script.get_args_parser().parse_args(
        ["--checkpoint", str(checkpoint), "--workers", "0", "--no_progress", "--device", "cpu", *map(str, extra)])


def test_test_py_refuses_a_checkpoint_changed_after_saving(tiny_checkpoint, tmp_path, monkeypatch):
    changed = shutil.copy(tiny_checkpoint, tmp_path / "best.pt")
    change_a_weight(changed)
    monkeypatch.setattr(evaluate_script, "encode_split", lambda *a, **k: pytest.fail("evaluated"))
    with pytest.raises(CFineError, match=r"best\.pt: its content does not match the checksum written with it"):
        evaluate_script.main(eval_args(changed, "--output_dir", tmp_path / "eval"))
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("value", ["CUHK-PEDES/", "./CUHK-PEDES", "processed_data/CUHK-PEDES"])
def test_dataset_takes_a_benchmark_name_not_a_folder(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        eval_args("x.pt", "--dataset", value)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f'argument --dataset: "{value}" is not a benchmark name; dataset takes one of CUHK-PEDES, ICFG-PEDES, ' \
           "RSTPReid (the folder that holds it is --data_root)" in err


@pytest.mark.parametrize("remove", [lambda state: state.pop("args"), lambda state: state["args"].pop("dataset"),
                                    lambda state: state.update(args=["not", "a", "dict"])])
def test_a_checkpoint_without_its_runs_dataset_is_one_line(tiny_checkpoint, processed_root, tmp_path, remove):
    state = load_checkpoint(tiny_checkpoint)
    remove(state)
    save_checkpoint(state, tmp_path / "hand.pt")
    with pytest.raises(CFineError, match=r"hand\.pt: the checkpoint does not record the dataset its run trained on "
                                         r"\(args\.dataset\): pass --dataset NAME"):
        evaluate_script.main(eval_args(tmp_path / "hand.pt", "--data_root", processed_root))
    # Told the dataset, it evaluates (the data check needs the run's record, which this checkpoint lacks).
    assert evaluate_script.main(eval_args(tmp_path / "hand.pt", "--data_root", processed_root,
                                          "--dataset", "CUHK-PEDES", "--output_dir", tmp_path / "eval")) == 0


def test_save_features_holds_what_was_ranked_in_dataset_order(tiny_checkpoint, processed_root, tmp_path):
    out = tmp_path / "eval"
    assert evaluate_script.main(eval_args(tiny_checkpoint, "--output_dir", out, "--save_features", out / "f.npz")) == 0
    saved = np.load(out / "f.npz", allow_pickle=False)
    assert set(saved.files) == set(FEATURE_KEYS)
    split = load_split(processed_root / "CUHK-PEDES", "test")
    records = split.records
    captions = [(caption, r["pid"]) for r in records for caption in r["captions"]]
    n, width = load_model(tiny_checkpoint)[0].feature_shape
    for side, rows in (("gallery", len(records)), ("query", len(captions))):
        features = saved[side]
        assert features.dtype == np.float32 and features.shape == (rows, n * width)  # the concatenation
        assert np.allclose(np.linalg.norm(features, axis=1), 1.0, rtol=0, atol=1e-6)
    assert saved["gallery_paths"].tolist() == [str(split.image_root / r["image"]) for r in records]
    assert saved["gallery_pids"].tolist() == [r["pid"] for r in records]
    assert saved["query_captions"].tolist() == [caption for caption, _ in captions]
    assert saved["query_pids"].tolist() == [pid for _, pid in captions]
    assert saved["gallery_pids"].dtype == saved["query_pids"].dtype == np.int64
    # The metrics test.py wrote are those of the saved features, recomputed by evaluation/metrics.py.
    metrics = json.loads((out / "metrics.json").read_text())
    query, gallery = torch.from_numpy(saved["query"]), torch.from_numpy(saved["gallery"])
    query_pids, gallery_pids = torch.from_numpy(saved["query_pids"]), torch.from_numpy(saved["gallery_pids"])
    assert evaluate_retrieval(query, gallery, query_pids, gallery_pids) == metrics["t2i"]
    assert evaluate_retrieval(gallery, query, gallery_pids, query_pids) == metrics["i2t"]


def test_save_features_never_writes_through_a_link_and_checks_its_folder_first(tiny_checkpoint, tmp_path, monkeypatch):
    victim = tmp_path / "victim.npz"
    victim.write_bytes(b"not to be touched")
    (tmp_path / "f.npz").symlink_to(victim)
    assert evaluate_script.main(eval_args(tiny_checkpoint, "--output_dir", tmp_path / "eval",
                                          "--save_features", tmp_path / "f.npz")) == 0
    assert victim.read_bytes() == b"not to be touched"
    assert not (tmp_path / "f.npz").is_symlink() and set(np.load(tmp_path / "f.npz").files) == set(FEATURE_KEYS)
    # A place that cannot take the file is refused before anything is encoded.
    (tmp_path / "taken").write_text("a file, not a folder")
    monkeypatch.setattr(evaluate_script, "encode_split", lambda *a, **k: pytest.fail("evaluated first"))
    with pytest.raises(CFineError, match=r"--save_features .*taken/f\.npz: cannot write there"):
        evaluate_script.main(eval_args(tiny_checkpoint, "--output_dir", tmp_path / "eval",
                                       "--save_features", tmp_path / "taken" / "f.npz"))
    with pytest.raises(CFineError, match=r"--save_features .*: is a folder; name the \.npz file to write"):
        evaluate_script.main(eval_args(tiny_checkpoint, "--output_dir", tmp_path / "eval", "--save_features", tmp_path))


def test_test_py_applies_the_runs_tf32_setting_before_encoding(tiny_checkpoint, tmp_path, monkeypatch):
    state = load_checkpoint(tiny_checkpoint)
    state["args"]["tf32"] = "on"  # not the default: the value must come from the run
    save_checkpoint(state, tmp_path / "tf32.pt")
    applied, at_encoding = [], []

    class Encoded(Exception):
        pass

    def encode(*args, **kwargs):
        at_encoding.append(list(applied))
        raise Encoded

    monkeypatch.setattr(evaluate_script, "use_tf32", applied.append)
    monkeypatch.setattr(evaluate_script, "encode_split", encode)
    with pytest.raises(Encoded):
        evaluate_script.main(eval_args(tmp_path / "tf32.pt", "--output_dir", tmp_path / "eval"))
    assert at_encoding == [["on"]]


@pytest.mark.parametrize("trained, given, expected", [("off", None, "off"), ("auto", None, "auto"),
                                                       ("bf16", None, "auto"), ("off", "bf16", "bf16")])
def test_amp_defaults_to_off_for_a_run_trained_without_autocast(tiny_checkpoint, tmp_path, monkeypatch, trained,
                                                                given, expected):
    state = load_checkpoint(tiny_checkpoint)
    state["args"]["amp"] = trained
    save_checkpoint(state, tmp_path / "run.pt")
    asked = []

    class Resolved(Exception):
        pass

    def resolve(mode, device):
        asked.append(mode)
        raise Resolved

    monkeypatch.setattr(evaluate_script, "resolve_amp", resolve)
    flags = ["--output_dir", tmp_path / "eval", *(["--amp", given] if given else [])]
    with pytest.raises(Resolved):
        evaluate_script.main(eval_args(tmp_path / "run.pt", *flags))
    assert asked == [expected]


def test_an_mgf_off_checkpoint_is_evaluated_and_indexed_on_the_global_feature(processed_root, test_split_photos,
                                                                              tmp_path, capsys):
    """--mgf off (issue 21): test.py and search.py rebuild the model from the checkpoint's config alone; its one
    feature is [BN(global)], so the paper's concatenation is the global feature and an index row is D wide, not 3D."""
    import train
    from models.checkpoint import load_model
    from retrieval.build_index import update_index
    from retrieval.index import read_index
    from tests.conftest import TINY_TRAIN_FLAGS

    run = tmp_path / "run"
    assert train.main(train.parse_args(["--data_root", str(processed_root), "--output_dir", str(run), *TINY_TRAIN_FLAGS,
                                        "--epochs", "1", "--mgf", "off"])) == 0
    model, state = load_model(run / "best.pt")
    assert state["config"]["mgf"] is False and model.head.mgf is None
    width = model.config.width
    assert model.feature_shape == (1, width)
    assert evaluate_script.main(eval_args(run / "best.pt", "--data_root", processed_root,
                                          "--output_dir", tmp_path / "eval")) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["t2i"] == metrics["t2i_global"] and metrics["i2t"] == metrics["i2t_global"]
    table = capsys.readouterr().out
    assert "text->image [global]" in table and "lg1" not in table  # the table names the one feature it ranked
    from export.export_folder import export_checkpoint
    from export.torchscript_file import torchscript_runner

    export_checkpoint(run / "best.pt", "torchscript", tmp_path / "exported")
    images = torch.randn(3, 3, *model.config.clip.vision.image_size)
    exported = torchscript_runner(tmp_path / "exported" / "image_encoder.pt")(images)
    from models.cfine import retrieval_features

    with torch.no_grad():
        expected = retrieval_features(model.eval().encode_images(images)).numpy()
    assert exported.shape == (3, width) and abs(exported - expected).max() <= 1e-4 * abs(expected).max()
    update_index(run / "best.pt", test_split_photos, tmp_path / "index", torch.device("cpu"), workers=0, progress=False)
    index = read_index(tmp_path / "index")
    assert index.features.shape == (len(index.images), width)
