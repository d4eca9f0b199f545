"""The CFine model on a tiny CLIP: training signal, inference path, retrieval features, weights and config."""
import json

import pytest
import torch

from clip.model import CLIP, CLIPConfig
from models import CFine, CFineConfig, retrieval_features
from tests.conftest import random_caption_ids
from tests.tolerance import assert_close, skip_bf16_attention_if_forced_default

pytestmark = pytest.mark.usefixtures("single_thread")
# fp32 roundings in another summation order or batch size, relative to the largest entry (tests/tolerance.py);
# measured at most 1.7e-7 over the CPU settings of tests/tolerance.py.
REL = 2e-6


def _model(num_classes=4, seed=0) -> CFine:
    torch.manual_seed(seed)
    return CFine(CFineConfig(clip=CLIPConfig.tiny(), num_classes=num_classes))


def test_tiny_cfine_loss_falls_on_a_fixed_batch():
    model = _model().train()
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ids, pids = random_caption_ids(8), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    history = []
    for _ in range(30):
        out = model(images, ids, pids)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        history.append(float(out.loss.detach()))
    assert all(torch.isfinite(torch.tensor(history)))
    assert sum(history[-5:]) / 5 < 0.5 * sum(history[:5]) / 5
    assert set(out.losses) == {"cmpm", "cmpc", "diversity", "ranking"}
    assert_close(sum(out.losses.values()), out.loss.detach(), REL)


def test_output_is_named_and_shaped():
    model = _model().train()
    out = model(torch.randn(4, 3, 32, 32), random_caption_ids(4), torch.tensor([0, 1, 2, 3]))
    assert out.image_features.shape == out.text_features.shape == (4, 3, 64)
    assert out.loss.ndim == 0 and out.loss.requires_grad
    assert all(not v.requires_grad for v in out.losses.values())


def test_encode_apart_equals_the_joint_forward_in_eval():
    model = _model().eval()
    images, ids = torch.randn(5, 3, 32, 32), random_caption_ids(5)
    with torch.no_grad():
        joint = model(images, ids, torch.arange(5) % 4)
        assert joint.loss is None
        assert_close(model.encode_images(images), joint.image_features, REL)
        assert_close(model.encode_texts(ids), joint.text_features, REL)
        # gallery and queries are encoded apart: a sample's features do not depend on the rest of its batch
        assert_close(model.encode_texts(ids[:2]), joint.text_features[:2], REL)


def test_retrieval_features_concat_and_global():
    features = torch.randn(6, 3, 16)
    concat, global_only = retrieval_features(features), retrieval_features(features, mode="global")
    assert concat.shape == (6, 48) and global_only.shape == (6, 16)
    assert_close(concat.norm(dim=1), torch.ones(6), REL)
    assert_close(concat * features.flatten(1).norm(dim=1, keepdim=True), features.flatten(1), REL)
    assert_close(global_only, features[:, 0] / features[:, 0].norm(dim=1, keepdim=True), REL)
    with pytest.raises(ValueError, match="concat"):
        retrieval_features(features, mode="mean")


@skip_bf16_attention_if_forced_default
def test_bf16_autocast_full_model_gives_fp32_loss_and_finite_gradients():
    model = _model().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(4, 3, 32, 32), random_caption_ids(4), torch.tensor([0, 1, 1, 2]))
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_load_clip_weights_strictly_from_module_or_state_dict():
    model = _model()
    torch.manual_seed(123)
    pretrained = CLIP(CLIPConfig.tiny())
    model.load_clip_weights(pretrained)
    for name, value in pretrained.state_dict().items():
        assert torch.equal(model.clip.state_dict()[name], value), name
    model.load_clip_weights(_model(seed=5).clip.state_dict())
    assert not model.clip.logit_scale.requires_grad
    with pytest.raises(RuntimeError, match="clip config"):
        model.load_clip_weights(CLIP(CLIPConfig.tiny(width=32)))


def test_config_round_trips_through_json_and_rebuilds_the_model():
    config = CFineConfig(clip=CLIPConfig.tiny(image_size=(64, 32)), num_classes=7,
                         loss_weights={"cmpm_weights": (1.0, 0.5, 0.1)})
    stored = config.to_dict()
    assert stored["cmpm_weights"] == [1.0, 0.5, 0.1] and stored["ranking_weight"] == 10.0  # keys as checkpoints had
    assert "loss_weights" not in stored
    restored = CFineConfig.from_dict(json.loads(json.dumps(stored)))
    assert restored == config and restored.cmpm_weights == (1.0, 0.5, 0.1)
    model = CFine(config)
    rebuilt = CFine(restored)
    rebuilt.load_state_dict(model.state_dict())  # strict: same architecture from the config alone
    defaults = CFineConfig()
    assert (defaults.tau_cs, defaults.tau_cd, defaults.k_word, defaults.k_patch) == (0.07, 0.01, 3, 3)
    assert (defaults.cmpm_weights, defaults.diversity_weight, defaults.ranking_weight) == ((1, 1, 0.1), 0.2, 10)
    assert defaults.clip == CLIPConfig.vit_b16()
    with pytest.raises(ValueError, match="unknown keys"):
        CFineConfig.from_dict({"num_classes": 3, "tau": 1.0})


SWITCHED = {  # docs/method.md §5, ablation switches: one per switch, and the table's baseline row
    "mgf_off": {"mgf": False},
    "cfr_off": {"cfr": False},
    "fcd_off": {"fcd": False},
    "baseline": {"mgf": False, "cfr": False, "fcd": False,
                 "loss_weights": {"diversity_weight": 0.0, "ranking_weight": 0.0}},
}


def test_switches_round_trip_and_an_older_config_without_them_loads_as_on():
    config = CFineConfig(clip=CLIPConfig.tiny(), num_classes=4, mgf=False, fcd=False)
    stored = json.loads(json.dumps(config.to_dict()))
    assert (stored["mgf"], stored["cfr"], stored["fcd"]) == (False, True, False)
    assert CFineConfig.from_dict(stored) == config
    older = {key: value for key, value in stored.items() if key not in ("mgf", "cfr", "fcd")}
    restored = CFineConfig.from_dict(older)
    assert (restored.mgf, restored.cfr, restored.fcd) == (True, True, True)


def test_cfr_and_fcd_both_off_refuse_a_weighted_ranking_loss():
    with pytest.raises(ValueError, match="cfr and fcd both off leave the ranking loss no similarity S, but "
                                         "ranking_weight is 10: set it to 0"):
        CFineConfig(clip=CLIPConfig.tiny(), cfr=False, fcd=False)
    config = CFineConfig(clip=CLIPConfig.tiny(), cfr=False, fcd=False, loss_weights={"ranking_weight": 0.0})
    assert not config.trains_similarity
    with pytest.raises(ValueError, match="mgf is 'off'; it takes true or false"):
        CFineConfig(clip=CLIPConfig.tiny(), mgf="off")


@pytest.mark.parametrize("name", sorted(SWITCHED))
def test_one_training_step_per_switch(name):
    torch.manual_seed(0)
    model = CFine(CFineConfig(clip=CLIPConfig.tiny(), num_classes=4, **SWITCHED[name])).train()
    n = 1 if name in ("mgf_off", "baseline") else 3
    assert model.feature_shape == (n, 64)
    assert any(key.startswith("head.mgf.") for key in model.state_dict()) == (n == 3)
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ids, pids = random_caption_ids(8), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    trainable = {key: p for key, p in model.named_parameters() if p.requires_grad}
    before = {key: p.detach().clone() for key, p in trainable.items()}
    optimizer = torch.optim.Adam(trainable.values(), lr=1e-3)
    out = model(images, ids, pids)
    assert out.image_features.shape == out.text_features.shape == (8, n, 64)
    assert set(out.losses) == {"cmpm", "cmpc", "diversity", "ranking"} and torch.isfinite(out.loss)
    assert_close(sum(out.losses.values()), out.loss.detach(), REL)
    optimizer.zero_grad()
    out.loss.backward()
    optimizer.step()
    # Every trainable weight takes part (DDP runs without find_unused_parameters) and moves.
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable.values())
    assert all(not torch.equal(before[key], p) for key, p in trainable.items()), name
    model.eval()
    with torch.no_grad():
        assert model.encode_images(images).shape == model.encode_texts(ids).shape == (8, *model.feature_shape)
