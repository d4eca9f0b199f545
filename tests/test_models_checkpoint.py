"""models/checkpoint.py: atomic writes that survive a full disk, and clear errors for unusable files."""
import errno

import pytest
import torch

from clip.config import CLIPConfig
from models import checkpoint as ckpt
from models.cfine import CFine
from models.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from models.config import CFineConfig


def test_roundtrip_with_weights_only(tmp_path):
    state = {"model": {"w": torch.arange(4.0)}, "epoch": 3, "config": {"a": [1, 2]}}
    save_checkpoint(state, tmp_path / "last.pt")
    loaded = load_checkpoint(tmp_path / "last.pt")
    assert loaded["epoch"] == 3 and torch.equal(loaded["model"]["w"], torch.arange(4.0))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_out_of_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1}, path)

    def full_disk(obj, f):
        f.write(b"partial data")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="could not be written.*previous checkpoint.*unchanged"):
        save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left


def test_torch_writer_failure_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    # A full disk inside torch.save's zip writer surfaces as RuntimeError, not OSError.
    path = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1}, path)

    def writer_fails(obj, f):
        f.write(b"partial data")
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(ckpt.torch, "save", writer_fails)
    with pytest.raises(CheckpointError, match="could not be written.*file write failed.*unchanged"):
        save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_link_planted_at_the_destination_is_replaced_not_written_through(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").symlink_to(victim)
    save_checkpoint({"epoch": 1}, run / "last.pt")
    assert victim.read_text() == "keep me"
    assert not (run / "last.pt").is_symlink() and load_checkpoint(run / "last.pt")["epoch"] == 1


def test_missing_truncated_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_checkpoint(tmp_path / "absent.pt")
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.zeros(1000)}}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="last.pt: cannot be read.*truncated or corrupt"):
        load_checkpoint(path)
    foreign = tmp_path / "clip.pt"
    torch.save({"visual.proj": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a CFine checkpoint"):
        load_checkpoint(foreign)


def test_checkpoint_from_another_model_is_rejected_by_load_model(tmp_path):
    model = CFine(CFineConfig(clip=CLIPConfig.tiny(), num_classes=5))
    other = CFine(CFineConfig(clip=CLIPConfig.tiny(width=128), num_classes=5))
    save_checkpoint({"model": other.state_dict(), "config": model.config.to_dict()}, tmp_path / "mixed.pt")
    with pytest.raises(CheckpointError, match="weights do not match"):
        load_model(tmp_path / "mixed.pt", torch.device("cpu"))
