"""engine/model_setup.py: --clip PATH loads pretrained weights into the encoders strictly; a damaged file or an
image size its patches do not tile is one clear error naming the file."""
import pytest
import torch

import train
from engine.model_setup import build_model
from tests.conftest import assert_same_tensors
from utils.errors import CFineError


def test_clip_path_loads_pretrained_weights_into_the_encoders(tmp_path, capsys):
    from clip.config import CLIPConfig
    from clip.model import CLIP

    torch.manual_seed(7)
    pretrained = CLIP(CLIPConfig.tiny(image_size=(64, 32)))
    torch.save({"state_dict": pretrained.state_dict()}, tmp_path / "tiny_clip.pt")
    args = train.parse_args(["--clip", str(tmp_path / "tiny_clip.pt"), "--image_size", "64", "32"])
    model = build_model(args, num_classes=7)
    assert_same_tensors(model.clip.state_dict(), pretrained.state_dict())
    assert model.config.num_classes == 7 and model.config.clip == pretrained.config
    with pytest.raises(CFineError, match="--clip: .*damaged.pt: cannot be read"):
        (tmp_path / "damaged.pt").write_bytes(b"not a checkpoint")
        build_model(train.parse_args(["--clip", str(tmp_path / "damaged.pt")]), num_classes=7)
    torch.save(CLIP(CLIPConfig.tiny()).state_dict(), tmp_path / "square.pt")  # 32x32: its grid can be resized
    with pytest.raises(CFineError, match="image_size takes multiples of the patch size 8 of --clip .*square.pt"):
        build_model(train.parse_args(["--clip", str(tmp_path / "square.pt"), "--image_size", "60", "32"]), 7)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        train.parse_args(["--clip", str(tmp_path / "no-such.pt")])
    assert "no-such.pt: no such file; clip takes a released name" in capsys.readouterr().err
