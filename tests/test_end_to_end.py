"""The user's path, as subprocesses: synthetic data -> data.sh -> train.py (2 epochs) -> test.py."""
import json
import math
import os
import shutil
import subprocess
import sys

import torch
from PIL import Image

from models.checkpoint import load_checkpoint
from tests.conftest import REPO, TINY_TRAIN_FLAGS, metrics_rows


def run(*command, cwd=REPO):
    # One intra-op thread, as tests/test_distributed.py's torchrun: two made training 20x slower on a busy 2-core runner.
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def test_synthetic_to_data_sh_to_train_to_test(tmp_path):
    run(sys.executable, "-m", "datasets.synthetic.generate", "--out", str(tmp_path / "raw"), "--format", "CUHK-PEDES",
        "--ids", "48", "--images_per_id", "3", "--seed", "3")
    run("bash", str(REPO / "data.sh"), str(tmp_path / "raw"), "CUHK-PEDES", "--out", str(tmp_path / "processed"))
    assert (tmp_path / "processed" / "CUHK-PEDES" / "val_reid.json").is_file()

    out = tmp_path / "run"
    run(sys.executable, "train.py", "--data_root", str(tmp_path / "processed"), "--output_dir", str(out),
        *TINY_TRAIN_FLAGS, "--epochs", "2", "--eval_at_start")
    for name in ("last.pt", "best.pt", "metrics.jsonl", "config.json"):
        assert (out / name).is_file(), name
    history = metrics_rows(out, drop=())
    assert [row["epoch"] for row in history] == [0, 1, 2]
    untrained, trained = history[0], max(history[1:], key=lambda row: row["R1"])
    assert trained["R1"] > untrained["R1"]
    assert {"loss", "loss_cmpm", "loss_cmpc", "loss_diversity", "loss_ranking", "lr_head", "lr_image_encoder",
            "lr_text_encoder", "R1", "R5", "R10", "mAP", "mINP", "seconds", "pairs_per_s"} <= set(history[1])

    stdout = run(sys.executable, "test.py", "--checkpoint", str(out / "best.pt"), "--visualize", "2", "--plot",
                 "--workers", "0", "--no_progress", "--device", "cpu")
    assert "text->image [global+lg1+lg2]" in stdout and "image->text [global only]" in stdout
    metrics = json.loads((out / "eval_test" / "metrics.json").read_text())
    assert metrics["split"] == "test" and {"t2i", "i2t", "t2i_global", "i2t_global"} <= set(metrics)
    assert set(metrics["t2i"]) >= {"R1", "R5", "R10", "mAP", "mINP"}
    pages = sorted((out / "eval_test" / "visualize").glob("*.png"))
    assert len(pages) == 2
    with Image.open(pages[0]) as page:
        assert page.width > 10 * 64  # ten ranked gallery tiles side by side
    assert (out / "eval_test" / "training_curves.png").is_file()


def test_test_py_rejects_bad_checkpoints(tmp_path):
    missing = subprocess.run([sys.executable, "test.py", "--checkpoint", str(tmp_path / "none.pt")], cwd=REPO,
                             capture_output=True, text=True)
    assert missing.returncode != 0 and "no such checkpoint file" in missing.stderr
    truncated = tmp_path / "cut.pt"
    truncated.write_bytes(b"PK\x03\x04 not really a zip")
    result = subprocess.run([sys.executable, "test.py", "--checkpoint", str(truncated)], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode != 0 and "truncated or corrupt" in result.stderr


def test_bert_mode_trains_and_test_py_rebuilds_it_from_the_checkpoint_alone(processed_root, tmp_path):
    """docs/method.md §9 through the user's commands: a tiny random BERT folder (Hugging Face layout), 2 epochs, test.py."""
    from tests.bert_fixtures import write_bert_folder

    bert = write_bert_folder(tmp_path / "bert-tiny", hidden=64)
    out = tmp_path / "bert_run"
    run(sys.executable, "train.py", "--data_root", str(processed_root), "--output_dir", str(out), *TINY_TRAIN_FLAGS,
        "--epochs", "2", "--text_encoder", "bert", "--bert", str(bert), "--mean_std", "imagenet", "--amp", "off")
    state = load_checkpoint(out / "last.pt")
    assert state["config"]["text_encoder"] == "bert" and state["config"]["clip"]["text"] is None
    assert state["text_vocab"] == (bert / "vocab.txt").read_text()
    assert any(key.startswith("bert.encoder.layer.1.attention") for key in state["model"])
    assert "clip.visual.proj" not in state["model"]
    history = metrics_rows(out, drop=())
    assert [row["epoch"] for row in history] == [1, 2] and all(math.isfinite(row["loss"]) for row in history)

    # Resume is exact in bert mode too (BERT's dropout draws from the checkpointed RNG state).
    split = tmp_path / "bert_split"
    common = ("--data_root", str(processed_root), "--output_dir", str(split), *TINY_TRAIN_FLAGS, "--text_encoder",
              "bert", "--bert", str(bert), "--mean_std", "imagenet", "--amp", "off")
    run(sys.executable, "train.py", *common, "--epochs", "1")
    run(sys.executable, "train.py", *common, "--epochs", "2", "--resume", str(split / "last.pt"))
    resumed = load_checkpoint(split / "last.pt")["model"]
    assert resumed.keys() == state["model"].keys()
    assert all(torch.equal(resumed[key], state["model"][key]) for key in resumed)

    shutil.rmtree(bert)  # evaluation needs nothing but the checkpoint
    stdout = run(sys.executable, "test.py", "--checkpoint", str(out / "best.pt"), "--workers", "0", "--no_progress",
                 "--device", "cpu")
    assert "text->image [global+lg1+lg2]" in stdout
    metrics = json.loads((out / "eval_test" / "metrics.json").read_text())
    assert 0 <= metrics["t2i"]["R1"] <= 100


def test_bert_mode_without_a_usable_folder_is_one_clear_error(processed_root, tmp_path):
    command = [sys.executable, "train.py", "--data_root", str(processed_root), "--output_dir", str(tmp_path / "r"),
               *TINY_TRAIN_FLAGS, "--epochs", "1", "--text_encoder", "bert"]
    missing_flag = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert missing_flag.returncode != 0 and "needs --bert FOLDER" in missing_flag.stderr
    (tmp_path / "empty").mkdir()
    empty = subprocess.run(command + ["--bert", str(tmp_path / "empty")], cwd=REPO, capture_output=True, text=True)
    assert empty.returncode != 0 and "missing config.json, vocab.txt" in empty.stderr
    assert "Traceback" not in empty.stderr
