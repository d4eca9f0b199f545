"""train.py: exact resume, stop signals, non-finite losses, config files."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import train
from tests.conftest import REPO, TINY_TRAIN_FLAGS
from utils.checkpoint import load_checkpoint

TIMING_KEYS = ("seconds", "pairs_per_s")


def run_train(processed_root, out_dir, *extra):
    args = train.parse_args(["--data_root", str(processed_root), "--output_dir", str(out_dir), *TINY_TRAIN_FLAGS, *extra])
    return train.main(args)


def rows(out_dir):
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in lines]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_is_exact(processed_root, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_train(processed_root, straight, "--epochs", "4") == 0
    assert run_train(processed_root, split, "--epochs", "2") == 0
    assert run_train(processed_root, split, "--epochs", "4", "--resume", str(split / "last.pt")) == 0

    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(split / "last.pt")
    assert_same_weights(a["model"], b["model"])
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for key in a["optimizer"]["state"]:
        assert torch.equal(a["optimizer"]["state"][key]["exp_avg"], b["optimizer"]["state"][key]["exp_avg"])
    assert rows(straight) == rows(split)
    assert [r["epoch"] for r in rows(split)] == [1, 2, 3, 4]
    # The training changed the weights (so equality above is not trivially true).
    first = load_checkpoint(split / "best.pt") if (split / "best.pt").exists() else None
    assert first is not None


def test_sigterm_mid_epoch_saves_and_resumes_exactly(processed_root, tmp_path):
    out = tmp_path / "interrupted"
    command = [sys.executable, "train.py", "--data_root", str(processed_root), "--output_dir", str(out),
               *TINY_TRAIN_FLAGS, "--epochs", "20"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in process.stdout:  # the first epoch's JSON row is printed after its checkpoint is written
        if line.startswith('{"epoch": 1,'):
            process.send_signal(signal.SIGTERM)
            break
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert "stopped by SIGTERM" in stderr and "--resume" in stderr
    state = load_checkpoint(out / "last.pt")
    assert state["epoch"] == 1 and state["step_in_epoch"] > 0  # saved in the middle of epoch 2

    assert run_train(processed_root, out, "--epochs", "3", "--resume", str(out / "last.pt")) == 0
    straight = tmp_path / "straight"
    assert run_train(processed_root, straight, "--epochs", "3") == 0
    assert_same_weights(load_checkpoint(out / "last.pt")["model"], load_checkpoint(straight / "last.pt")["model"])
    assert [r["epoch"] for r in rows(out)] == [1, 2, 3]


class _NaNAfter:
    """Patch for CFine.forward: the loss becomes NaN on the training steps listed in `steps` (1-based)."""

    def __init__(self, forward, steps):
        self.forward, self.steps, self.calls = forward, steps, 0

    def __call__(self, model, *args, **kwargs):
        out = self.forward(model, *args, **kwargs)
        if model.training and out.loss is not None:
            self.calls += 1
            if self.steps is None or self.calls in self.steps:
                out.loss = out.loss * float("nan")
        return out


def test_nonfinite_losses_are_skipped_and_counted(processed_root, tmp_path, monkeypatch):
    patch = _NaNAfter(train.CFine.forward, steps={2, 3, 5})
    monkeypatch.setattr(train.CFine, "forward", lambda m, *a, **k: patch(m, *a, **k))
    assert run_train(processed_root, tmp_path / "nan", "--epochs", "1") == 0
    row = rows(tmp_path / "nan")[0]
    assert row["skipped_steps"] == 3
    assert all(torch.isfinite(torch.tensor(v)) for k, v in row.items() if k.startswith("loss"))


def test_too_many_nonfinite_losses_abort_and_keep_the_last_good_checkpoint(processed_root, tmp_path, monkeypatch):
    out = tmp_path / "diverge"
    assert run_train(processed_root, out, "--epochs", "1") == 0
    good = load_checkpoint(out / "last.pt")
    patch = _NaNAfter(train.CFine.forward, steps=None)
    monkeypatch.setattr(train.CFine, "forward", lambda m, *a, **k: patch(m, *a, **k))
    with pytest.raises(SystemExit, match="diverged: 4 non-finite losses in a row"):
        run_train(processed_root, out, "--epochs", "2", "--max_nonfinite", "4", "--resume", str(out / "last.pt"))
    kept = load_checkpoint(out / "last.pt")
    assert kept["epoch"] == 1
    assert_same_weights(kept["model"], good["model"])


def test_config_file_values_and_flag_overrides(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"epochs": 7, "lr_head": 0.5, "milestones": [1, 2]}))
    args = train.parse_args(["--config", str(config), "--lr_head", "0.25"])
    assert args.epochs == 7 and args.lr_head == 0.25 and args.milestones == [1, 2]
    config.write_text(json.dumps({"epochz": 7}))
    with pytest.raises(SystemExit):
        train.parse_args(["--config", str(config)])


def test_repository_configs_parse_and_hold_the_spec_hyperparameters():
    for name in ("cuhk_pedes", "icfg_pedes", "rstpreid"):
        args = train.parse_args(["--config", str(REPO / "configs" / f"{name}.json")])
        assert (args.batch_size, args.epochs, args.lr_head, args.lr_image, args.lr_text, args.wd_image) == (
            32, 50, 1e-4, 1e-5, 1e-5, 4e-5)
        assert (args.warmup_epochs, args.warmup_start, args.milestones, args.seed) == (10, 0.01, [20, 25, 35], 42)
    demo = train.parse_args(["--config", str(REPO / "configs" / "demo.json")])
    assert demo.clip == "none" and demo.clip_arch == "tiny"


def test_missing_processed_data_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match=r"does not exist: run `bash data\.sh"):
        run_train(tmp_path / "nowhere", tmp_path / "out", "--epochs", "1")


def test_batch_larger_than_the_data_is_a_clear_error(processed_root, tmp_path):
    with pytest.raises(SystemExit, match="fewer than one batch"):
        run_train(processed_root, tmp_path / "out", "--epochs", "1", "--batch_size", "100000")


def test_resume_defaults_to_the_runs_data_and_folder(processed_root, tmp_path):
    out = tmp_path / "run"
    assert run_train(processed_root, out, "--epochs", "1") == 0
    args = train.parse_args(["--resume", str(out / "last.pt"), "--epochs", "2", *TINY_TRAIN_FLAGS])
    assert args.data_root is None and args.output_dir is None
    assert train.main(args) == 0
    assert args.data_root == str(processed_root) and args.output_dir == str(out)
    assert [r["epoch"] for r in rows(out)] == [1, 2]


def test_clip_path_loads_pretrained_weights_into_the_encoders(tmp_path):
    from clip.config import CLIPConfig
    from clip.model import CLIP

    torch.manual_seed(7)
    pretrained = CLIP(CLIPConfig.tiny(image_size=(64, 32)))
    torch.save({"state_dict": pretrained.state_dict()}, tmp_path / "tiny_clip.pt")
    args = train.parse_args(["--clip", str(tmp_path / "tiny_clip.pt"), "--image_size", "64", "32"])
    model = train.build_model(args, num_classes=7)
    assert_same_weights(model.clip.state_dict(), pretrained.state_dict())
    assert model.config.num_classes == 7 and model.config.clip == pretrained.config
    with pytest.raises(SystemExit, match="--clip: .*no-such.pt"):
        train.build_model(train.parse_args(["--clip", str(tmp_path / "no-such.pt")]), num_classes=7)
