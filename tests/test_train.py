"""train.py: runs that never overwrite silently, resume that continues the same run exactly (with its own
settings and its own data), stop signals, non-finite steps, save failures."""
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import train
from engine.control import StopRequest
from engine.data import check_resumed_data
from engine.run_files import claim_output_dir
from engine.run_state import run_settings
from models.cfine import CFine
from models.checkpoint import load_checkpoint, save_checkpoint
from tests.conftest import REPO, TINY_TRAIN_FLAGS, assert_same_tensors, metrics_rows, moved_copy
from utils import distributed
from utils.errors import CFineError

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
# The run every resume below must reproduce: its length, evaluation cadence and limits are not the defaults.
RUN_FLAGS = [*TINY_TRAIN_FLAGS, "--epochs", "3", "--eval_every", "2", "--max_nonfinite", "7"]
ONE_PROCESS = distributed.DistInfo()
# One intra-op thread for the whole module (module fixtures included) and its subprocesses (ONE_THREAD): on a busy
# 2-core runner two threads made an epoch 20x slower, and runs compared bit for bit must use the same thread count.
pytestmark = pytest.mark.usefixtures("module_single_thread")


def run_train(processed_root, out_dir, *extra):
    args = train.parse_args(["--data_root", str(processed_root), "--output_dir", str(out_dir), *TINY_TRAIN_FLAGS, *extra])
    return train.main(args)


def resume(checkpoint, *extra):
    return train.main(train.parse_args(["--resume", str(checkpoint), *extra]))


def assert_same_run(a_dir, b_dir):
    """Bit-identical weights, optimizer state and metrics rows (timings aside)."""
    a, b = load_checkpoint(a_dir / "last.pt"), load_checkpoint(b_dir / "last.pt")
    assert_same_tensors(a["model"], b["model"])
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for key in a["optimizer"]["state"]:
        assert torch.equal(a["optimizer"]["state"][key]["exp_avg"], b["optimizer"]["state"][key]["exp_avg"])
    assert metrics_rows(a_dir) == metrics_rows(b_dir)


class StopAfter(StopRequest):
    """A StopRequest that asks to stop after `steps` training steps, as a SIGTERM would."""

    def __init__(self, steps):
        super().__init__()
        self.left = steps

    @property
    def requested(self):
        self.left -= 1
        return self.left < 0


@pytest.fixture(scope="module")
def straight(processed_root, tmp_path_factory):
    """The uninterrupted run (3 epochs, evaluated after epochs 2 and 3)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert run_train(processed_root, out, *RUN_FLAGS[len(TINY_TRAIN_FLAGS):]) == 0
    assert [(r["epoch"], "R1" in r) for r in metrics_rows(out)] == [(1, False), (2, True), (3, True)]
    return out


def copy_run(run, tmp_path):
    """A private copy of a run folder (resuming writes into the checkpoint's folder)."""
    return shutil.copytree(run, tmp_path / "run")


# ---------------------------------------------------------------- resume continues the same run


def test_resume_with_a_larger_epochs_extends_the_run_exactly(processed_root, straight, tmp_path):
    split = tmp_path / "split"
    assert run_train(processed_root, split, *RUN_FLAGS[len(TINY_TRAIN_FLAGS):], "--epochs", "2") == 0
    # Nothing but --resume and the longer length: data, folder, device and the rest come from the checkpoint.
    args = train.parse_args(["--resume", str(split / "last.pt"), "--epochs", "3"])
    assert args.data_root is None and args.output_dir is None
    assert train.main(args) == 0
    assert args.data_root is None and args.output_dir is None  # the flags stay as parsed; the run's settings are a copy
    for settings in (vars(run_settings(args)[0]), json.loads((split / "config.json").read_text())["args"]):
        assert settings["data_root"] == str(processed_root) and settings["output_dir"] == str(split)
        assert (settings["eval_every"], settings["max_nonfinite"], settings["batch_size"]) == (2, 7, 16)
    assert_same_run(straight, split)
    assert [r["epoch"] for r in metrics_rows(split)] == [1, 2, 3]


def test_a_chunked_run_resumes_bit_exactly_and_trains_like_the_whole_batch_run(processed_root, straight, tmp_path,
                                                                              capsys):
    """Gradient caching (--chunk_size 5: chunks of 5, 5, 5 and 1 per batch of 16) in train.py."""
    flags = [*RUN_FLAGS[len(TINY_TRAIN_FLAGS):], "--eval_every", "1", "--epochs", "2", "--chunk_size", "5"]
    chunked, split = tmp_path / "chunked", tmp_path / "split"
    assert run_train(processed_root, chunked, *flags) == 0
    assert "gradient caching: encoders run 5 pairs at a time (twice)" in capsys.readouterr().out
    assert run_train(processed_root, split, *flags[:-2], "--epochs", "1", "--chunk_size", "5") == 0
    assert resume(split / "last.pt", "--epochs", "2") == 0  # the chunk size comes from the checkpoint
    assert_same_run(chunked, split)
    assert load_checkpoint(split / "last.pt")["args"]["chunk_size"] == 5
    # The same training signal as the whole-batch run: equal first-epoch losses up to rounding.
    first, whole = metrics_rows(chunked)[0], metrics_rows(straight)[0]
    for key in ("loss", "loss_cmpm", "loss_cmpc", "loss_diversity", "loss_ranking"):
        assert first[key] == pytest.approx(whole[key], rel=1e-4), key


def test_a_chunk_larger_than_the_batch_is_refused_on_resume_too(straight):
    with pytest.raises(CFineError, match=r"--chunk_size 17 is larger than the batch \(16 per process\)"):
        resume(straight / "last.pt", "--epochs", "4", "--chunk_size", "17")


def test_sigterm_mid_epoch_saves_and_the_printed_command_reproduces_the_run(processed_root, straight, tmp_path):
    out = tmp_path / "interrupted"
    command = [sys.executable, "train.py", "--data_root", str(processed_root), "--output_dir", str(out), *RUN_FLAGS]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1", **ONE_THREAD})
    for line in process.stdout:  # the first epoch's table row is printed after its checkpoint is written
        if line.split()[:1] == ["1/3"]:
            process.send_signal(signal.SIGTERM)
            break
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 143, stderr
    assert "stopped by SIGTERM" in stderr
    state = load_checkpoint(out / "last.pt")
    assert state["epoch"] == 1 and state["step_in_epoch"] > 0  # saved in the middle of epoch 2

    printed = shlex.split(stderr.split("Resume with: ")[1].splitlines()[0])
    assert printed[:2] == ["python", "train.py"]
    assert train.main(train.parse_args(printed[2:])) == 0
    # Every row equals the uninterrupted run's, the interrupted epoch's losses included, exactly: the running sums
    # of its steps before the stop travel in last.pt as float32 tensors and the resumed steps add to them in the
    # same order, so the sums are the same floats.
    assert metrics_rows(out) == metrics_rows(straight)
    assert_same_tensors(load_checkpoint(out / "last.pt")["model"], load_checkpoint(straight / "last.pt")["model"])


@pytest.mark.parametrize("flags, named", [
    (["--batch_size", "8"], "--batch_size 8 conflicts .* which has batch_size 16"),
    (["--dataset", "ICFG-PEDES"], "--dataset ICFG-PEDES conflicts .* which has dataset CUHK-PEDES"),
    (["--clip_arch", "vit_b16"], "--clip_arch vit_b16 conflicts .* which has clip_arch tiny"),
    (["--eval_every", "1"], "--eval_every 1 conflicts .* which has eval_every 2"),
    (["--image_size", "32", "32"], "--image_size 32 32 conflicts .* which has image_size 64 32"),
    (["--gather_features"], "--gather_features True conflicts .* which has gather_features False"),
    (["--epochs", "2"], "--epochs 2 conflicts .* which has epochs 3 \\(a resumed run can only be extended"),
])
def test_flags_that_conflict_with_the_resumed_run_are_errors(straight, flags, named):
    before = (straight / "last.pt").read_bytes()
    with pytest.raises(CFineError, match=named):
        resume(straight / "last.pt", *flags)
    assert (straight / "last.pt").read_bytes() == before


def test_config_values_given_with_resume_are_checked_like_flags(straight, tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"lr_head": 0.5}))
    with pytest.raises(CFineError, match='--config .*c.json: "lr_head" 0.5 conflicts .* which has lr_head 0.001'):
        resume(straight / "last.pt", "--config", str(config))


def test_resuming_a_finished_run_without_a_longer_epochs_does_nothing(straight, capsys):
    before = {p.name: p.read_bytes() for p in straight.iterdir()}
    assert resume(straight / "last.pt", "--epochs", "3", "--device", "cpu") == 0  # equal and KEPT values are fine
    assert "finished all 3 epochs; pass --epochs N (> 3)" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in straight.iterdir()} == before


# ---------------------------------------------------------------- output folders


def test_a_new_run_refuses_a_non_empty_folder_unless_resume_or_overwrite(processed_root, straight, tmp_path, capsys):
    out = copy_run(straight, tmp_path)
    best = (out / "best.pt").read_bytes()
    with pytest.raises(CFineError, match=r"is not empty .*--resume .*last\.pt.*--overwrite"):
        run_train(processed_root, out, "--epochs", "1")
    assert (out / "best.pt").read_bytes() == best and len(metrics_rows(out)) == 3
    assert run_train(processed_root, out, "--epochs", "1", "--overwrite") == 0
    assert [r["epoch"] for r in metrics_rows(out)] == [1]
    assert load_checkpoint(out / "best.pt")["epoch"] == 1


def files_under(folder):
    """Every file under folder (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# Starts that fail after the flags parse: missing data, and an --amp mode this device lacks (found only once the
# device is known).
FAILED_STARTS = {"bad --data_root": (lambda root, tmp: tmp / "nowhere", [], r"does not exist: run `bash data\.sh"),
                 "--amp fp16 on a CPU": (lambda root, tmp: root, ["--amp", "fp16"], "--amp fp16 needs a CUDA device")}


@pytest.mark.parametrize("failure", FAILED_STARTS)
def test_a_failed_start_writes_nothing_and_the_retry_runs(processed_root, tmp_path, failure):
    data_root, flags, named = FAILED_STARTS[failure]
    out = tmp_path / "new" / "run"
    with pytest.raises(CFineError, match=named):
        run_train(data_root(processed_root, tmp_path), out, "--epochs", "1", *flags)
    assert not out.exists()  # no train.log (nor the folder it would have made) to block the retry
    mine = tmp_path / "mine"
    mine.mkdir()  # a folder the user made: kept, empty
    with pytest.raises(CFineError, match=named):
        run_train(data_root(processed_root, tmp_path), mine, "--epochs", "1", *flags)
    assert mine.is_dir() and not list(mine.iterdir())
    assert run_train(processed_root, out, "--epochs", "1") == 0  # the retry with good flags
    assert [r["epoch"] for r in metrics_rows(out)] == [1] and (out / "train.log").stat().st_size > 0


def test_a_start_that_fails_building_the_model_writes_nothing(processed_root, tmp_path):
    pytest.importorskip("transformers")
    from tests.bert_fixtures import write_bert_folder

    bert = write_bert_folder(tmp_path / "bert", hidden=64)
    weights = bert / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a download cut short
    out = tmp_path / "run"
    with pytest.raises(CFineError, match=r"model\.safetensors is damaged or truncated"):
        run_train(processed_root, out, "--epochs", "1", "--text_encoder", "bert", "--bert", str(bert), "--mean_std",
                  "imagenet", "--amp", "off")
    assert not out.exists()


@pytest.mark.parametrize("failure", FAILED_STARTS)
def test_an_overwrite_whose_start_fails_keeps_the_old_run_intact(processed_root, straight, tmp_path, failure):
    out = copy_run(straight, tmp_path)
    (out / "tb").mkdir()
    (out / "tb" / "events.out.tfevents.1.host").write_bytes(b"the old run's events")
    before = files_under(out)
    assert before["train.log"] and "last.pt" in before and "metrics.jsonl" in before
    data_root, flags, named = FAILED_STARTS[failure]
    with pytest.raises(CFineError, match=named):
        run_train(data_root(processed_root, tmp_path), out, "--epochs", "1", "--overwrite", *flags)
    assert files_under(out) == before


def full_disk_writing(monkeypatch, name):
    """The fsync of a temporary file for `name` (how utils/files writes it) fails as on a full disk."""
    import errno
    import tempfile

    temporaries, real_mkstemp, real_fsync = {}, tempfile.mkstemp, os.fsync

    def mkstemp(*args, **kwargs):
        fd, path = real_mkstemp(*args, **kwargs)
        temporaries[fd] = os.path.basename(path)
        return fd, path

    def fsync(fd):
        if temporaries.get(fd, "").startswith(f".{name}."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr("utils.files.tempfile.mkstemp", mkstemp)
    monkeypatch.setattr("utils.files.os.fsync", fsync)


@pytest.mark.parametrize("name", ["config.json", "environment.json"])
def test_a_full_disk_writing_the_start_files_is_one_line_and_changes_nothing(processed_root, straight, tmp_path,
                                                                             monkeypatch, name):
    full_disk_writing(monkeypatch, name)
    named = rf"{re.escape(name)}: could not be written \(No space left on device\); nothing in .* was changed"
    out = tmp_path / "new"
    with pytest.raises(CFineError, match=named):
        run_train(processed_root, out, "--epochs", "1")
    assert not out.exists()  # no half-started run to block the retry
    old = copy_run(straight, tmp_path)
    before = files_under(old)
    with pytest.raises(CFineError, match=named):  # the run --overwrite would replace is kept whole
        run_train(processed_root, old, "--epochs", "1", "--overwrite")
    assert files_under(old) == before
    assert not [p.name for p in tmp_path.rglob("*.tmp")]
    monkeypatch.undo()
    assert run_train(processed_root, out, "--epochs", "1") == 0


def test_a_folder_without_a_checkpoint_is_refused_without_pointing_at_a_missing_last_pt(tmp_path):
    out = tmp_path / "run"  # what a run that failed before its first checkpoint leaves
    out.mkdir()
    (out / "train.log").write_text("epoch 1 ...\n")
    (out / "config.json").write_text("{}")
    settings = run_settings(train.parse_args(["--output_dir", str(out)]))[0]
    with pytest.raises(CFineError, match=r"is not empty \(config\.json, train\.log\) but holds no checkpoint to "
                                         r"resume: pass --overwrite") as error:
        claim_output_dir(settings, ONE_PROCESS)
    assert "--resume" not in str(error.value)


def test_default_output_folders_depend_on_the_dataset_and_never_collide_silently(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cuhk, rstp = train.parse_args([]), train.parse_args(["--dataset", "RSTPReid"])
    assert str(claim_output_dir(run_settings(cuhk)[0], ONE_PROCESS)) == "runs/cuhk_pedes"
    assert str(claim_output_dir(run_settings(rstp)[0], ONE_PROCESS)) == "runs/rstpreid"
    assert cuhk.output_dir is None  # the flags stay as parsed: the run's settings are a copy
    (tmp_path / "runs" / "cuhk_pedes" / "last.pt").write_bytes(b"a run")
    with pytest.raises(CFineError, match="runs/cuhk_pedes is not empty"):
        claim_output_dir(run_settings(train.parse_args([]))[0], ONE_PROCESS)


def test_stale_temporary_files_are_removed_when_a_run_starts(straight, tmp_path):
    out = copy_run(straight, tmp_path)
    stale = [out / ".last.pt.k3j_9zq1.tmp", out / ".metrics.jsonl.a0b1c2d3.tmp"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    args = train.parse_args(["--resume", str(out / "last.pt")])
    assert claim_output_dir(run_settings(args)[0], ONE_PROCESS) == out
    assert not any(path.exists() for path in stale) and (out / "last.pt").is_file()


# ---------------------------------------------------------------- the run's data


def test_resume_checks_the_data_and_accepts_a_moved_copy(processed_root, straight, tmp_path):
    moved = moved_copy(processed_root, tmp_path)
    args = train.parse_args(["--resume", str(straight / "last.pt"), "--data_root", str(moved)])
    settings, state = run_settings(args)
    check_resumed_data(settings, state)  # the same data elsewhere: fine

    other = moved_copy(processed_root, tmp_path / "x", lambda m: m["annotation"].update(sha256="0" * 64))
    with pytest.raises(CFineError, match=r"is not the data .*last\.pt was trained on \(its annotation's sha256 is "
                                         r"000000000000…"):
        resume(straight / "last.pt", "--epochs", "4", "--data_root", str(other))
    more = moved_copy(processed_root, tmp_path / "y", lambda m: m["splits"]["train"].update(ids=99))
    with pytest.raises(CFineError, match="its splits are train 99 ids"):
        resume(straight / "last.pt", "--epochs", "4", "--data_root", str(more))


def test_a_class_count_mismatch_is_an_error_not_an_index_error(processed_root, straight, tmp_path):
    state = load_checkpoint(straight / "last.pt")
    del state["data"], state["format"]  # as a checkpoint written before the data was recorded
    old = tmp_path / "old" / "last.pt"
    save_checkpoint(state, old)
    more = moved_copy(processed_root, tmp_path, lambda m: m["splits"]["train"].update(ids=33))
    with pytest.raises(CFineError, match="has 33 training identities, but the run .* has a classifier over 32"):
        resume(old, "--epochs", "4", "--data_root", str(more))


@pytest.mark.parametrize("remove, named", [
    (lambda state: state.pop("args"), r"the checkpoint does not record its run's settings \(args\)"),
    (lambda state: state["args"].pop("dataset"), r"the checkpoint does not record its run's settings \(args\.dataset\)"),
    (lambda state: state.pop("optimizer"), r"the checkpoint lacks optimizer \(train\.py's state"),
    (lambda state: state.update(model={}), r"its state does not fit the run it describes \(RuntimeError: Error\(s\) "
                                           r"in loading state_dict"),
])
def test_a_checkpoint_without_its_settings_or_state_is_one_line_on_resume(straight, tmp_path, remove, named):
    state = load_checkpoint(straight / "last.pt")
    remove(state)
    save_checkpoint(state, tmp_path / "hand" / "last.pt")
    with pytest.raises(CFineError, match=f"--resume .*last\\.pt: {named}"):
        resume(tmp_path / "hand" / "last.pt", "--epochs", "4")
    assert sorted(p.name for p in (tmp_path / "hand").iterdir()) == ["last.pt"]


def test_resume_refuses_a_checkpoint_changed_after_saving(straight, tmp_path):
    from tests.test_models_checkpoint import change_a_weight

    out = copy_run(straight, tmp_path)
    change_a_weight(out / "last.pt")
    before = files_under(out)
    with pytest.raises(CFineError, match=r"last\.pt: its content does not match the checksum .*best\.pt.* or retrain"):
        resume(out / "last.pt", "--epochs", "4")
    assert files_under(out) == before


# ---------------------------------------------------------------- numerical faults and save failures


class _Faults:
    """Patch for CFine.forward: on the listed training steps (1-based), a NaN batch of images (BN running statistics
    and the loss go NaN), a NaN loss, or a finite loss whose gradients are NaN."""

    def __init__(self, forward, steps):
        self.forward, self.steps, self.calls = forward, steps, 0

    def __call__(self, model, images, tokens, pids=None):
        if not model.training or pids is None:
            return self.forward(model, images, tokens, pids)
        self.calls += 1
        fault = self.steps.get(self.calls) if self.steps is not None else "loss"
        out = self.forward(model, images * float("nan") if fault == "images" else images, tokens, pids)
        if fault == "loss":
            out.loss = out.loss * float("nan")
        elif fault == "grads":
            out.loss = _NaNGradient.apply(out.loss)
        return out


class _NaNGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def _inject(monkeypatch, steps):
    patch = _Faults(CFine.forward, steps)
    monkeypatch.setattr(CFine, "forward", lambda m, *a, **k: patch(m, *a, **k))
    return patch


def test_non_finite_steps_are_skipped_weights_untouched_and_bn_statistics_put_back(processed_root, tmp_path, monkeypatch,
                                                                                    capsys):
    _inject(monkeypatch, {2: "images", 3: "loss", 5: "grads"})
    assert run_train(processed_root, tmp_path / "nan", "--epochs", "1") == 0
    row = metrics_rows(tmp_path / "nan")[0]
    assert row["skipped_steps"] == 3
    assert all(torch.isfinite(torch.tensor(v)) for k, v in row.items() if k.startswith("loss"))
    state = load_checkpoint(tmp_path / "nan" / "last.pt")
    for name, tensor in state["model"].items():  # BN running statistics and every weight
        assert torch.isfinite(tensor.float()).all(), name
    output = capsys.readouterr()
    steps = int(re.search(r"(\d+) steps/epoch", output.out).group(1))
    # BN runs 3 times a step (global, lg1, lg2): the skipped steps left no trace in its statistics.
    assert state["model"]["head.image_bn.num_batches_tracked"] == 3 * (steps - 3)
    errors = output.err
    assert "step 2: non-finite loss, step skipped (1 in a row, 1 in total)" in errors
    assert "step 5: non-finite gradients, step skipped (1 in a row, 3 in total)" in errors


def test_divergence_keeps_the_last_good_checkpoint_and_names_it(straight, tmp_path, monkeypatch):
    out = copy_run(straight, tmp_path)
    good = load_checkpoint(out / "last.pt")
    _inject(monkeypatch, None)
    with pytest.raises(CFineError, match=r"diverged at epoch 4: 4 steps in a row had a non-finite loss .*"
                                         r"last\.pt holds the last good state"):
        resume(out / "last.pt", "--epochs", "4", "--max_nonfinite", "4")
    kept = load_checkpoint(out / "last.pt")
    assert kept["epoch"] == 3
    assert_same_tensors(kept["model"], good["model"])


def test_divergence_before_any_checkpoint_says_so(processed_root, tmp_path, monkeypatch):
    _inject(monkeypatch, None)
    with pytest.raises(CFineError, match="diverged at epoch 1: .*no checkpoint of this run was written yet") as error:
        run_train(processed_root, tmp_path / "new", "--epochs", "1", "--max_nonfinite", "3")
    assert "last.pt" not in str(error.value) and not (tmp_path / "new" / "last.pt").exists()


def test_a_failing_save_is_a_clear_error_and_keeps_the_previous_checkpoint(straight, tmp_path, monkeypatch):
    out = copy_run(straight, tmp_path)
    before = (out / "last.pt").read_bytes()

    def disk_full(obj, f):
        f.write(b"partial")
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr("models.checkpoint.torch.save", disk_full)
    monkeypatch.setattr(train, "StopRequest", lambda: StopAfter(1))
    with pytest.raises(CFineError, match=r"last\.pt: could not be written .*file write failed.*unchanged"):
        resume(out / "last.pt", "--epochs", "4")
    assert (out / "last.pt").read_bytes() == before
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------- settings and boundaries


def test_config_file_values_and_flag_overrides(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"epochs": 7, "lr_head": 0.5, "milestones": [1, 2]}))
    args = train.parse_args(["--config", str(config), "--lr_head", "0.25"])
    assert args.epochs == 7 and args.lr_head == 0.25 and args.milestones == [1, 2]
    config.write_text(json.dumps({"epochz": 7}))
    with pytest.raises(SystemExit):
        train.parse_args(["--config", str(config)])


def test_missing_processed_data_is_a_clear_error(tmp_path):
    with pytest.raises(CFineError, match=r"does not exist: run `bash data\.sh"):
        run_train(tmp_path / "nowhere", tmp_path / "out", "--epochs", "1")


def test_batch_larger_than_the_data_is_a_clear_error(processed_root, tmp_path):
    with pytest.raises(CFineError, match="fewer than one batch"):
        run_train(processed_root, tmp_path / "out", "--epochs", "1", "--batch_size", "100000")
