"""train.log (the console without progress bars), environment.json, and --tensorboard's event files."""
import json
import re
import subprocess
import sys

import pytest
import torch
from tqdm import tqdm

import engine.environment as environment
import train
from engine.run_log import ConsoleCopy, TrainingBoard, epoch_table_header, epoch_table_row
from tests.conftest import TINY_TRAIN_FLAGS, metrics_rows
from utils.errors import CFineError

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


def test_console_copy_keeps_the_lines_printed_after_real_tqdm_bars(tmp_path, capsys):
    log = tmp_path / "train.log"
    with ConsoleCopy() as console:
        console.start(log, append=False)
        for leave in (True, False):  # a finished bar stays on screen / erases itself (the evaluation's bars)
            for _ in tqdm(range(3), desc="encode", file=sys.stderr, leave=leave, mininterval=0):
                pass
            print(f"after a bar, leave={leave}", file=sys.stderr)
        bar = tqdm(total=4, desc="epoch 2", file=sys.stderr, mininterval=0)
        bar.update(1)
        print("stopped by SIGTERM at epoch 2", file=sys.stderr)  # the interrupted bar is still open
        bar.close()
        print("done")
    assert log.read_text() == "after a bar, leave=True\nafter a bar, leave=False\nstopped by SIGTERM at epoch 2\ndone\n"
    assert "encode" in capsys.readouterr().err  # the console did show the bars


def test_console_copy_holds_the_lines_until_the_log_starts_and_drops_them_if_it_never_does(tmp_path, capsys):
    log = tmp_path / "train.log"
    with ConsoleCopy() as console:
        console.hold()  # a run's checks: printed, held, no file yet
        print("resumed run x")
        print("partial", end="", file=sys.stderr)
        print(" line", file=sys.stderr)
        assert not log.exists()
        console.start(log, append=False)
        print("after the checks")
    assert log.read_text() == "resumed run x\npartial line\nafter the checks\n"
    assert "resumed run x" in capsys.readouterr().out
    with pytest.raises(CFineError):
        with ConsoleCopy() as console:
            console.hold()
            print("checking")
            raise CFineError("a check failed")
    assert type(sys.stdout).__name__ != "_Tee" and "checking" in capsys.readouterr().out
    assert log.read_text().endswith("after the checks\n")  # nothing held was written anywhere


ROW = {"epoch": 2, "loss": 12.34567, "loss_cmpm": 3.5, "loss_cmpc": 8.25, "loss_diversity": 0.0456, "loss_ranking": 0.5449,
       "lr_head": 5.5e-05, "lr_image_encoder": 5.5e-06, "skipped_steps": 0, "seconds": 81.26, "pairs_per_s": 1234.56,
       "eval_split": "val", "R1": 45.678, "R5": 70.0, "R10": 80.004, "mAP": 40.5, "mINP": 20.25, "R1_global": 1.0,
       "i2t_R1": 2.0, "checkpoint_s": 0.5}


def test_epoch_table_rows_line_up_under_the_header_and_show_the_fields_to_watch():
    legend, titles = epoch_table_header("val_carved").splitlines()
    assert "val_carved" in legend and "* = best R@1" in legend
    row = epoch_table_row(ROW, 50, best=True)
    assert [i for i, c in enumerate(row) if c == "|"] == [i for i, c in enumerate(titles) if c == "|"]
    losses, metrics, speed = (part.split() for part in row.split("|"))
    assert losses == ["2/50", "12.346", "3.500", "8.250", "0.046", "0.545", "5.50e-05"]
    assert metrics == ["45.68", "70.00", "80.00", "40.50", "20.25"]
    assert speed == ["81.3", "1234.6", "*"]
    ends = [{m.end() for m in re.finditer(r"\S+", line)} for line in (row, titles)]
    assert len(ends[0]) == 15 + 2 and ends[0] <= ends[1]  # 15 cells and 2 bars, each ending where its title ends
    assert "{" not in row and "R1_global" not in row  # the whole record stays in metrics.jsonl


def test_epoch_table_marks_missing_values_and_only_a_new_best():
    untrained = epoch_table_row({"epoch": 0, "R1": 5.0, "R5": 6.0, "R10": 7.0, "mAP": 8.0, "mINP": 9.0}, 3, best=False)
    losses, metrics, speed = (part.split() for part in untrained.split("|"))
    assert losses == ["0/3", *["-"] * 6] and metrics == ["5.00", "6.00", "7.00", "8.00", "9.00"] and speed == ["-", "-"]
    not_evaluated = {k: v for k, v in ROW.items() if k not in ("R1", "R5", "R10", "mAP", "mINP")}
    assert epoch_table_row(not_evaluated, 50, best=False).split("|")[1].split() == ["-"] * 5
    assert not epoch_table_row(ROW, 50, best=False).rstrip().endswith("*")


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
    assert "steps/epoch" in log and "done: best val R@1" in log and "\r" not in log
    assert log.count(epoch_table_header("val")) == 1 and '{"epoch"' not in log  # the JSON rows: metrics.jsonl only
    history = metrics_rows(out, drop=())
    assert_log_shows(log, history, epochs=2, first=1)
    env = json.loads((out / "environment.json").read_text())
    assert len(env) == 1 and env[0]["torch"] == torch.__version__ and env[0]["start_epoch"] == 0
    assert env[0]["intra_op_threads"] == 1 and env[0]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    found = scalars(out / "tb")
    assert [s for s, _ in found["loss/loss"]] == [1, 2] and [s for s, _ in found["val/R1"]] == [1, 2]
    assert "lr/lr_head" in found and "loss/loss_cmpm" in found
    training_steps = sum(forwards)  # forwards in training mode (evaluation encodes without forward)
    assert training_steps >= 6 and [s for s, _ in found["step/loss"]] == list(range(3, training_steps + 1, 3))

    assert train.main(train.parse_args(["--resume", str(out / "last.pt"), "--epochs", "3"])) == 0
    log = (out / "train.log").read_text()
    assert log.count("steps/epoch") == 2 and log.count(epoch_table_header("val")) == 2  # appended, not replaced
    assert_log_shows(log, metrics_rows(out, drop=()), epochs=3, first=3)
    assert [r["start_epoch"] for r in json.loads((out / "environment.json").read_text())] == [0, 2]
    assert [s for s, _ in scalars(out / "tb")["val/R1"]][-1] == 3


def assert_log_shows(log: str, history: list[dict], epochs: int, first: int) -> None:
    """Each metrics.jsonl row from epoch `first` on has its line in the log's table, with the row's loss parts, lr,
    metrics, speed and whether it was the best so far."""
    best = max([row["R1"] for row in history if row["epoch"] < first], default=-1.0)
    # A printed cell is within half a unit of its last digit of the row's value (a tie like 1.75 -> "1.8" is exactly
    # half a unit away, so a hair of float slack is added).
    half = {3: 5e-4 + 1e-9, 2: 5e-3 + 1e-9, 1: 0.05 + 1e-9}
    for row in (row for row in history if row["epoch"] >= first):
        line = next(line for line in log.splitlines() if line.split()[:1] == [f"{row['epoch']}/{epochs}"])
        losses, metrics, speed = (part.split() for part in line.split("|"))
        keys = ("loss", "loss_cmpm", "loss_cmpc", "loss_diversity", "loss_ranking")
        assert [float(v) for v in losses[1:6]] == pytest.approx([row[k] for k in keys], abs=half[3])
        assert float(losses[6]) == pytest.approx(row["lr_head"], rel=5e-3)
        assert [float(v) for v in metrics] == pytest.approx([row[k] for k in ("R1", "R5", "R10", "mAP", "mINP")], abs=half[2])
        assert [float(v) for v in speed[:2]] == pytest.approx([row["seconds"], row["pairs_per_s"]], abs=half[1])
        assert (speed[2:] == ["*"]) == (row["R1"] > best)
        best = max(best, row["R1"])


def _counting(hook, calls):
    def counted(self, module, inputs, out):
        calls.append(module.training)
        return hook(self, module, inputs, out)
    return counted


def test_tensorboard_missing_is_a_one_line_error(processed_root, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    args = train.parse_args(["--data_root", str(processed_root), "--output_dir", str(tmp_path / "run"),
                             *TINY_TRAIN_FLAGS, "--epochs", "1", "--tensorboard"])
    with pytest.raises(CFineError, match="pip install tensorboard"):
        train.main(args)
    assert not (tmp_path / "run").exists()  # found before the run wrote anything (no empty train.log)
