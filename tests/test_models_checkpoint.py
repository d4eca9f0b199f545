"""models/checkpoint.py: atomic writes that survive a full disk, a checksum that catches content changed after
saving, and clear errors for unusable files."""
import errno
import shutil
from pathlib import Path

import pytest
import torch

from clip.config import CLIPConfig
from models import checkpoint as ckpt
from models.cfine import CFine
from models.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from models.config import CFineConfig
from utils.files import atomic_link


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


def change_a_weight(path: Path) -> None:
    """Change one byte inside the stored bytes of the checkpoint's first floating-point model tensor (its last
    element's lowest byte): a still well-formed file whose weights differ, which torch.load reads without complaint."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    tensor = next(t for t in state["model"].values() if t.is_floating_point() and t.numel() >= 4)
    stored = tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    data = bytearray(path.read_bytes())
    at = data.find(stored)
    assert at >= 0 and data.find(stored, at + 1) < 0
    data[at + len(stored) - tensor.element_size()] ^= 0x01
    path.write_bytes(bytes(data))
    assert not torch.equal(torch.load(path, map_location="cpu", weights_only=True)["model"][
        next(k for k, t in state["model"].items() if t is tensor)], tensor)  # torch.load succeeds, with other weights


def test_a_checkpoint_whose_weights_changed_after_saving_is_refused_naming_the_file(tmp_path):
    model = CFine(CFineConfig(clip=CLIPConfig.tiny(), num_classes=5))
    path = tmp_path / "run" / "last.pt"
    save_checkpoint({"model": model.state_dict(), "config": model.config.to_dict()}, path)
    load_model(path)  # verified and loaded
    shutil.copyfile(path, path.with_name("best.pt"))  # an earlier best epoch: another file
    change_a_weight(path)
    for load in (load_checkpoint, load_model):
        with pytest.raises(CheckpointError, match=r"last\.pt: its content does not match the checksum written with "
                                                  r"it .*Use .*best\.pt \(this run's other checkpoint\) if it is "
                                                  r"intact, or retrain"):
            load(path)
    load_model(path.with_name("best.pt"))  # the advice holds: the other file is intact


def test_a_damaged_checkpoint_whose_other_name_is_the_same_file_says_so(tmp_path):
    path = tmp_path / "run" / "last.pt"
    save_checkpoint({"model": {"w": torch.arange(4.0)}}, path)
    atomic_link(path, path.with_name("best.pt"))  # what train.py leaves when the last epoch was the best
    change_a_weight(path)
    for name, other in (("best.pt", "last.pt"), ("last.pt", "best.pt")):
        with pytest.raises(CheckpointError, match=rf"{name}: its content does not match .* {other} is the same file "
                                                  r"here \(a hard link.*damaged too: restore a copy .*or retrain"):
            load_checkpoint(path.with_name(name))
    path.with_name("best.pt").unlink()
    with pytest.raises(CheckpointError, match=r"last\.pt: its content .*\. Retrain, or restore a copy$"):
        load_checkpoint(path)


def test_the_checksum_covers_the_settings_and_history_too(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.arange(4.0)}, "args": {"dataset": "CUHK-PEDES"}, "history": [{"R1": 1.5}]},
                    path)
    data = path.read_bytes()
    assert data.count(b"CUHK-PEDES") == 1
    path.write_bytes(data.replace(b"CUHK-PEDES", b"ICFG-PEDES"))  # same length: the pickle still reads
    assert torch.load(path, weights_only=True)["args"]["dataset"] == "ICFG-PEDES"
    with pytest.raises(CheckpointError, match="does not match the checksum"):
        load_checkpoint(path)


def test_best_pt_a_hard_link_to_last_pt_verifies_under_either_name(tmp_path):
    from engine.run_files import save_files

    save_files(tmp_path, {"model": {"w": torch.randn(8)}}, best=True)
    assert (tmp_path / "best.pt").samefile(tmp_path / "last.pt")
    assert torch.equal(load_checkpoint(tmp_path / "best.pt")["model"]["w"], load_checkpoint(tmp_path / "last.pt")["model"]["w"])
    save_files(tmp_path, {"model": {"w": torch.randn(8)}})  # a later epoch that is not the best: best.pt stays valid
    load_checkpoint(tmp_path / "best.pt")
    load_checkpoint(tmp_path / "last.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]  # the checksum needs no sidecar


def test_a_checkpoint_written_before_checksums_still_loads_with_a_note(tmp_path, capsys):
    path = tmp_path / "old.pt"
    torch.save({"format": ckpt.FORMAT, "epoch": 2, "model": {"w": torch.zeros(3)}}, path)
    assert load_checkpoint(path)["epoch"] == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"note: {path} carries no checksum") and "not verified" in err[0]


def test_a_checkpoint_saved_from_any_device_verifies_after_loading(tmp_path):
    # bf16 and bool; a non-contiguous view (t); empty and 0-d tensors; one-element column views (c, c2: any stride)
    state = {"model": {"h": torch.randn(3, 5, dtype=torch.bfloat16), "m": torch.ones(2, dtype=torch.bool),
                       "t": torch.randn(4, 6).t(), "e": torch.zeros(0), "s": torch.tensor(3),
                       "c": torch.randn(1, 5)[:, 2], "c2": torch.randn(1, 5)[:, 2].clone()},
             "rng": {"python": (3, tuple(range(5)), None)}, "best": {"R1": float("nan"), "epoch": None}}
    save_checkpoint(state, tmp_path / "x.pt")
    loaded = load_checkpoint(tmp_path / "x.pt")
    assert torch.equal(loaded["model"]["t"], state["model"]["t"]) and loaded["rng"]["python"][1] == tuple(range(5))
