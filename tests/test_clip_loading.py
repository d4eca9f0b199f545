"""clip/loading.py: TorchScript and state-dict checkpoints, download, and every bad-checkpoint error."""
import hashlib

import pytest
import torch

import clip
from clip import loading
from clip.config import CLIPConfig
from clip.loading import CheckpointError
from clip.model import CLIP
from tests.tolerance import assert_close


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return CLIP(CLIPConfig.tiny()).eval()


@pytest.fixture(scope="module")
def inputs():
    return torch.randn(2, 3, 32, 32), clip.tokenize(["a man in a blue shirt", "a woman with a red bag"])


def _same_outputs(a, b, inputs):
    images, ids = inputs
    with torch.no_grad():
        assert torch.equal(a.encode_image(images), b.encode_image(images))
        assert torch.equal(a.encode_text(ids), b.encode_text(ids))


def test_torchscript_archive_loads_with_identical_outputs(tiny, inputs, tmp_path):
    # OpenAI's archives carry these non-weight entries in their state dict: emulate them.
    wrapper = CLIP(tiny.config).eval()
    wrapper.load_state_dict(tiny.state_dict())
    wrapper.register_buffer("input_resolution", torch.tensor(32))
    wrapper.register_buffer("context_length", torch.tensor(77))
    wrapper.register_buffer("vocab_size", torch.tensor(49408))
    scripted = torch.jit.trace(wrapper, inputs, check_trace=False)
    path = tmp_path / "tiny_jit.pt"
    torch.jit.save(scripted, str(path))
    model, config = clip.load(path)
    assert config == tiny.config
    _same_outputs(tiny, model, inputs)


@pytest.mark.parametrize("nesting", [None, "state_dict", "model", "module"])
def test_plain_state_dict_files_load(tiny, inputs, tmp_path, nesting):
    state = tiny.state_dict()
    if nesting == "module":
        payload = {f"module.{k}": v for k, v in state.items()}
    elif nesting:
        payload = {nesting: state, "epoch": 3}
    else:
        payload = state
    path = tmp_path / "tiny.pt"
    torch.save(payload, path)
    model, _ = clip.load(str(path))
    _same_outputs(tiny, model, inputs)


def test_half_precision_checkpoint_loads_as_fp32(tiny, tmp_path):
    path = tmp_path / "half.pt"
    torch.save({k: v.half() for k, v in tiny.state_dict().items()}, path)
    model, _ = clip.load(path)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="neither a file nor a released model name"):
        clip.load(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="no such file"):
        loading.read_state_dict(tmp_path / "nope.pt")


def test_truncated_file(tiny, tmp_path):
    path = tmp_path / "cut.pt"
    torch.save(tiny.state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pt: cannot be read.*truncated"):
        clip.load(path)


def test_corrupt_file(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"this is not a checkpoint" * 100)
    with pytest.raises(CheckpointError, match="garbage.pt: cannot be read"):
        clip.load(path)


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="does not contain a state dict"):
        clip.load(path)


def test_unexpected_and_missing_keys(tiny, tmp_path):
    state = dict(tiny.state_dict())
    state["visual.extra_head.weight"] = torch.zeros(3)
    del state["ln_final.bias"]
    path = tmp_path / "keys.pt"
    torch.save(state, path)
    expected = r"keys\.pt.*missing keys \['ln_final\.bias'\].*unexpected keys \['visual\.extra_head\.weight'\]"
    with pytest.raises(CheckpointError, match=expected):
        clip.load(path)


def test_wrong_shapes(tiny, tmp_path):
    state = dict(tiny.state_dict())
    state["visual.ln_post.weight"] = torch.ones(65)
    path = tmp_path / "shapes.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"shapes\.pt: tensors of the wrong shape: visual\.ln_post\.weight"):
        clip.load(path)


def test_resnet_checkpoint_is_not_supported(tmp_path):
    path = tmp_path / "rn50.pt"
    torch.save({"visual.layer1.0.conv1.weight": torch.zeros(1), "text_projection": torch.zeros(2, 2)}, path)
    with pytest.raises(CheckpointError, match="ResNet CLIP checkpoints are not supported"):
        clip.load(path)
    with pytest.raises(CheckpointError, match="not supported"):
        clip.load("RN50")


def test_not_a_clip_state_dict(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match="other.pt: not a CLIP ViT state dict"):
        clip.load(path)


def test_released_name_offline_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "_URL", "http://127.0.0.1:9/{sha}/{file}")  # nothing listens on port 9
    with pytest.raises(CheckpointError, match=r"put it at .*ViT-B-16\.pt"):
        clip.load("ViT-B/16", download_root=tmp_path)
    assert list(tmp_path.iterdir()) == []  # no partial file left behind


def test_released_name_downloads_checks_sha256_and_uses_cache(tiny, inputs, tmp_path, monkeypatch):
    served = tmp_path / "server"
    served.mkdir()
    source = served / "ViT-B-16.pt"
    torch.save(tiny.state_dict(), source)
    sha = hashlib.sha256(source.read_bytes()).hexdigest()
    monkeypatch.setitem(loading.RELEASED, "ViT-B/16", (sha, "ViT-B-16.pt"))
    monkeypatch.setattr(loading, "_URL", served.as_uri() + "/{file}")
    cache = tmp_path / "cache"
    model, _ = clip.load("ViT-B/16", download_root=cache)
    _same_outputs(tiny, model, inputs)
    assert sorted(p.name for p in cache.iterdir()) == ["ViT-B-16.pt"]

    # A cached file with the wrong checksum is downloaded again.
    (cache / "ViT-B-16.pt").write_bytes(b"truncated")
    clip.load("ViT-B/16", download_root=cache)
    assert hashlib.sha256((cache / "ViT-B-16.pt").read_bytes()).hexdigest() == sha

    # A download whose checksum does not match the release is rejected and not kept.
    monkeypatch.setitem(loading.RELEASED, "ViT-B/16", ("0" * 64, "ViT-B-16.pt"))
    (cache / "ViT-B-16.pt").unlink()
    with pytest.raises(CheckpointError, match="SHA256 does not match"):
        clip.load("ViT-B/16", download_root=cache)
    assert list(cache.iterdir()) == []


def _open_clip_tiny(quick_gelu: bool):
    """A tiny open_clip CLIP (same shapes as CLIPConfig.tiny()) and its model config, as open_clip writes it."""
    import open_clip  # test-only dependency (requirements-dev.txt)

    model_cfg = {"embed_dim": 64, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2}}
    if quick_gelu:
        model_cfg["quick_gelu"] = True
    torch.manual_seed(3)
    model = open_clip.CLIP(**model_cfg).eval()
    model.visual.image_mean, model.visual.image_std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    return model, model_cfg


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_open_clip_hub_layout_says_which_activation_and_gelu_is_refused(inputs, tmp_path, quick_gelu):
    from open_clip.push_to_hf_hub import save_config_for_hf

    reference, model_cfg = _open_clip_tiny(quick_gelu)
    torch.save(reference.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    save_config_for_hf(reference, tmp_path / "open_clip_config.json", model_config=model_cfg)
    if not quick_gelu:
        with pytest.raises(CheckpointError, match=r"open_clip_pytorch_model\.bin: these weights were trained with "
                                                  r"GELU \(so says .*open_clip_config\.json\).*QuickGELU"):
            clip.load(tmp_path / "open_clip_pytorch_model.bin")
        return
    model, _ = clip.load(tmp_path / "open_clip_pytorch_model.bin")
    _, ids = inputs
    with torch.no_grad():
        # fp32 roundings of open_clip's modules vs ours, relative to the largest entry (tests/tolerance.py); measured
        # 0 (bit-equal) over the CPU settings there, the bound allows a few roundings
        assert_close(model.encode_text(ids), reference.encode_text(ids), 1e-6)


@pytest.mark.parametrize("hint, accepted", [
    ({"model_name": "ViT-B-16"}, False),
    ({"model_name": "ViT-B-16-quickgelu"}, True),
    ({"arch": "ViT-L-14"}, False),
    ({"model_cfg": {"embed_dim": 64}}, False),
    ({"model_config": {"quick_gelu": True}}, True),
    ({"quick_gelu": False}, False),
    ({"quick_gelu": True}, True),
    ({"model_name": "ViT-B/16"}, True),  # OpenAI's spelling: not an open_clip config name, says nothing
])
@pytest.mark.parametrize("nested", [True, False])
def test_activation_hints_inside_the_checkpoint(tiny, tmp_path, hint, accepted, nested):
    state = tiny.state_dict()
    path = tmp_path / "hinted.pt"
    torch.save({"state_dict": state, **hint} if nested else {**state, **hint}, path)
    if accepted:
        model, _ = clip.load(path)
        assert torch.equal(model.state_dict()["ln_final.weight"], state["ln_final.weight"])
    else:
        with pytest.raises(CheckpointError, match="trained with GELU"):
            clip.load(path)
