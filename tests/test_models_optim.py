"""Optimiser groups and the per-epoch learning-rate schedule of docs/method.md §6."""
import pytest
import torch

from clip.model import CLIPConfig
from models import CFine, CFineConfig, build_optimizer, epoch_lr_factor, parameter_groups


@pytest.fixture(scope="module")
def model():
    return CFine(CFineConfig(clip=CLIPConfig.tiny(), num_classes=5))


def test_groups_partition_the_trainable_parameters(model):
    groups = {g["name"]: g for g in parameter_groups(model)}
    assert set(groups) == {"head", "image_encoder", "text_encoder"}
    assert (groups["head"]["lr"], groups["head"]["weight_decay"]) == (1e-4, 0.0)
    assert (groups["image_encoder"]["lr"], groups["image_encoder"]["weight_decay"]) == (1e-5, 4e-5)
    assert (groups["text_encoder"]["lr"], groups["text_encoder"]["weight_decay"]) == (1e-5, 0.0)
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    assert ids["head"].isdisjoint(ids["image_encoder"]) and ids["head"].isdisjoint(ids["text_encoder"])
    assert ids["image_encoder"].isdisjoint(ids["text_encoder"])
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set().union(*ids.values()) == trainable
    assert id(model.clip.logit_scale) not in trainable and id(model.head.image_bn.bias) not in trainable
    assert {id(p) for p in model.clip.visual.parameters()} == ids["image_encoder"]
    assert id(model.head.classifier.weight) in ids["head"]
    assert id(model.clip.token_embedding.weight) in ids["text_encoder"]


def test_epoch_factor_by_hand():
    assert epoch_lr_factor(0) == pytest.approx(0.01)
    assert epoch_lr_factor(5) == pytest.approx(0.01 * 0.5 + 0.5)
    assert epoch_lr_factor(9) == pytest.approx(0.01 * 0.1 + 0.9)
    assert [epoch_lr_factor(e) for e in (10, 19)] == [1.0, 1.0]
    assert [epoch_lr_factor(e) for e in (20, 24, 25, 34, 35, 49)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    )


def test_builder_returns_adam_with_per_epoch_lambda_schedule(model):
    optimizer, scheduler = build_optimizer(model, lr_head=2e-4)
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.defaults["betas"] == (0.9, 0.999) and optimizer.defaults["eps"] == 1e-8
    head = next(g for g in optimizer.param_groups if g["name"] == "head")
    seen = []
    for _ in range(21):
        seen.append(head["lr"])
        optimizer.step()
        scheduler.step()
    assert seen[0] == pytest.approx(2e-4 * 0.01) and seen[10] == pytest.approx(2e-4)
    assert seen[20] == pytest.approx(2e-5)
    _, restored = build_optimizer(model, lr_head=2e-4)
    restored.load_state_dict(scheduler.state_dict())  # resumable from a checkpoint dict
    assert restored.last_epoch == 21
