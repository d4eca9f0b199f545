"""train.log (the console without progress bars), environment.json, and --tensorboard's event files."""
import json
import subprocess
import sys

import pytest
import torch

import train
import utils.environment as environment
from tests.conftest import TINY_TRAIN_FLAGS
from utils.run_log import ConsoleCopy, TrainingBoard

pytestmark = pytest.mark.usefixtures("module_single_thread")  # tiny runs: threads only add overhead


def test_console_copy_keeps_printed_lines_and_drops_progress_bars(tmp_path, capsys):
    log = tmp_path / "train.log"
    with ConsoleCopy() as console:
        console.start(log, append=False)
        print("first line")
        sys.stderr.write("\repoch 1:  50%|#####     | 1/2\repoch 1: 100%|##########| 2/2\n")
        print("warning", file=sys.stderr)
        print("unfinished", end="")
    assert log.read_text() == "first line\nwarning\nunfinished\n"
    assert "first line" in capsys.readouterr().out  # the console still shows everything
    with ConsoleCopy() as console:
        console.start(log, append=True)
        print("resumed")
    assert log.read_text().endswith("unfinished\nresumed\n")
    assert not isinstance(sys.stdout, type(console)) and "resumed" in capsys.readouterr().out


def test_environment_records_versions_git_and_pip_freeze(tmp_path, monkeypatch):
    record = environment.describe_environment()
    assert record["torch"] == torch.__version__ and record["python"] == sys.version.split()[0]
    assert set(record) >= {"cuda", "cudnn", "gpus", "git", "pip_freeze"}
    assert record["pip_freeze"] is None or any(line.lower().startswith("torch") for line in record["pip_freeze"])

    def no_git(*argv, **kwargs):
        raise FileNotFoundError(argv[0])
    monkeypatch.setattr(subprocess, "run", no_git)
    assert environment.git_state() == {"commit": None, "dirty": None}
    monkeypatch.setattr(environment, "pip_freeze", lambda: None)
    path = tmp_path / "environment.json"
    environment.record_environment(path, start_epoch=0)
    environment.record_environment(path, start_epoch=3)
    records = json.loads(path.read_text())
    assert [r["start_epoch"] for r in records] == [0, 3] and records[1]["pip_freeze"] is None


def scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_a_run_writes_train_log_environment_and_tensorboard(processed_root, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    forwards = []
    out = tmp_path / "run"
    args = train.parse_args(["--data_root", str(processed_root), "--output_dir", str(out), *TINY_TRAIN_FLAGS,
                             "--epochs", "2", "--tensorboard", "--log_every", "3"])
    monkeypatch.setattr(TrainingBoard, "_after_forward", _counting(TrainingBoard._after_forward, forwards))
    assert train.main(args) == 0
    log = (out / "train.log").read_text()
    assert "steps/epoch" in log and '{"epoch": 2' in log and "done: best val R@1" in log and "\r" not in log
    env = json.loads((out / "environment.json").read_text())
    assert len(env) == 1 and env[0]["torch"] == torch.__version__ and env[0]["start_epoch"] == 0
    found = scalars(out / "tb")
    assert [s for s, _ in found["loss/loss"]] == [1, 2] and [s for s, _ in found["val/R1"]] == [1, 2]
    assert "lr/lr_head" in found and "loss/loss_cmpm" in found
    training_steps = sum(forwards)  # forwards in training mode (evaluation encodes without forward)
    assert training_steps >= 6 and [s for s, _ in found["step/loss"]] == list(range(3, training_steps + 1, 3))

    assert train.main(train.parse_args(["--resume", str(out / "last.pt"), "--epochs", "3"])) == 0
    log = (out / "train.log").read_text()
    assert log.count("steps/epoch") == 2 and '{"epoch": 3' in log  # appended, not replaced
    assert [r["start_epoch"] for r in json.loads((out / "environment.json").read_text())] == [0, 2]
    assert [s for s, _ in scalars(out / "tb")["val/R1"]][-1] == 3


def _counting(hook, calls):
    def counted(self, module, inputs, out):
        calls.append(module.training)
        return hook(self, module, inputs, out)
    return counted


def test_tensorboard_missing_is_a_one_line_error(processed_root, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    args = train.parse_args(["--data_root", str(processed_root), "--output_dir", str(tmp_path / "run"),
                             *TINY_TRAIN_FLAGS, "--epochs", "1", "--tensorboard"])
    with pytest.raises(SystemExit, match="pip install tensorboard"):
        train.main(args)
