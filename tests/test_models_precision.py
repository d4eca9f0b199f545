"""--tf32 (models/precision.py use_tf32): it sets both of PyTorch's TF32 switches, a run records it in its checkpoints and
config.json and resumes with it, a checkpoint from before the setting resumes with it off, and only the `paper`
configs turn it on (the authors' PyTorch 1.7 ran float32 matrix products as TF32: docs/faithfulness.md)."""
import json
import shutil
from pathlib import Path

import pytest
import torch

import train
from engine.run_state import run_settings
from engine.settings import TABLE
from models.checkpoint import load_checkpoint, save_checkpoint
from models.precision import use_tf32
from tests.conftest import REPO, TINY_TRAIN_FLAGS

pytestmark = pytest.mark.usefixtures("module_single_thread")


def tf32_switches() -> tuple[bool, bool]:
    """(CUDA matmul, cuDNN) TF32 switches."""
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


@pytest.fixture(autouse=True)
def restore_tf32():
    """Every test here leaves PyTorch's TF32 switches as it found them (train.py's start sets them)."""
    before = tf32_switches()
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_use_tf32_sets_and_clears_both_switches():
    for start in (False, True):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = start
        use_tf32("on")
        assert tf32_switches() == (True, True)
        use_tf32("off")
        assert tf32_switches() == (False, False)


@pytest.fixture
def calls(monkeypatch):
    """The modes train.py's start passes to use_tf32, in order (the real function still runs)."""
    seen = []

    def record(mode):
        seen.append(mode)
        use_tf32(mode)

    monkeypatch.setattr(train, "use_tf32", record)
    return seen


@pytest.fixture(scope="module")
def tf32_run(processed_root, tmp_path_factory):
    """A one-epoch tiny run with --tf32 on."""
    out = tmp_path_factory.mktemp("tf32") / "run"
    before = tf32_switches()
    try:
        args = train.parse_args(["--data_root", str(processed_root), "--output_dir", str(out), *TINY_TRAIN_FLAGS,
                                 "--epochs", "1", "--tf32", "on"])
        assert train.main(args) == 0
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    return out


def copy_run(run: Path, tmp_path: Path) -> Path:
    """A private copy of a run folder (resuming writes into it)."""
    return Path(shutil.copytree(run, tmp_path / "run"))


def test_a_tf32_run_records_it_and_resumes_with_it(tf32_run, tmp_path, calls):
    assert load_checkpoint(tf32_run / "last.pt")["args"]["tf32"] == "on"
    assert json.loads((tf32_run / "config.json").read_text())["args"]["tf32"] == "on"
    out = copy_run(tf32_run, tmp_path)
    assert train.main(train.parse_args(["--resume", str(out / "last.pt"), "--epochs", "2"])) == 0
    assert calls == ["on"] and tf32_switches() == (True, True)
    resumed = load_checkpoint(out / "last.pt")
    assert resumed["epoch"] == 2 and resumed["args"]["tf32"] == "on"


def test_a_checkpoint_from_before_the_setting_resumes_with_tf32_off(tf32_run, tmp_path, calls):
    out = copy_run(tf32_run, tmp_path)
    state = load_checkpoint(out / "last.pt")
    del state["args"]["tf32"]  # as train.py wrote checkpoints before --tf32 existed
    save_checkpoint(state, out / "last.pt")
    settings, _ = run_settings(train.parse_args(["--resume", str(out / "last.pt")]))
    assert settings.tf32 == "off" == TABLE["tf32"].default
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    assert train.main(train.parse_args(["--resume", str(out / "last.pt"), "--epochs", "2"])) == 0
    assert calls == ["off"] and tf32_switches() == (False, False)
    assert load_checkpoint(out / "last.pt")["args"]["tf32"] == "off"


def test_only_the_paper_configs_turn_tf32_on():
    configs = sorted((REPO / "configs").glob("*.json"))
    paper = [path for path in configs if path.stem.endswith("_paper")]
    assert len(paper) == 3 and len(configs) > len(paper)
    for path in configs:
        written = json.loads(path.read_text())
        if path in paper:
            assert written.get("tf32") == "on", path.name
        else:
            assert "tf32" not in written, path.name  # the default, off
        assert train.parse_args(["--config", str(path)]).tf32 == ("on" if path in paper else "off"), path.name
