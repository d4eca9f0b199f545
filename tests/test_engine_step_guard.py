"""engine/step_guard.py: a step gone non-finite is taken back whole (buffers, weights, optimiser state)."""
import copy

import pytest
import torch
from torch import nn

from engine.step_guard import StepGuard, TrainingDiverged


def _setup(limit=3):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    return model, optimizer, StepGuard(model, optimizer, limit)


def _step(model, optimizer, guard, x, poison_grads=False):
    """One guarded training step; returns whether it was kept."""
    guard.save()
    loss = model(x).pow(2).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if poison_grads:
        model[0].weight.grad[0, 0] = float("nan")
    optimizer.step()
    loss_finite, weights_finite, _ = guard.verdict(loss, False)
    return guard.accept(loss_finite, weights_finite), loss_finite, weights_finite


def _snapshot(model, optimizer):
    return copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())


def _assert_equal(a, b):
    (model_a, opt_a), (model_b, opt_b) = a, b
    assert model_a.keys() == model_b.keys() and all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for p in opt_a["state"]:
        for k in opt_a["state"][p]:
            assert torch.equal(opt_a["state"][p][k], opt_b["state"][p][k]), (p, k)


@pytest.mark.parametrize("first_step", [True, False])
def test_a_nan_batch_leaves_bn_statistics_weights_and_adam_state_as_they_were(first_step):
    model, optimizer, guard = _setup()
    x = torch.randn(16, 4)
    if not first_step:
        assert _step(model, optimizer, guard, x)[0]
    before = _snapshot(model, optimizer)
    kept, loss_finite, weights_finite = _step(model, optimizer, guard, x * float("nan"))
    assert (kept, loss_finite) == (False, False)
    _assert_equal(_snapshot(model, optimizer), before)  # BN running_mean/var/num_batches_tracked included
    assert (guard.in_a_row, guard.total) == (1, 1)
    assert _step(model, optimizer, guard, x)[0] and guard.in_a_row == 0 and guard.total == 1


def test_non_finite_weights_after_a_finite_loss_are_undone():
    model, optimizer, guard = _setup()
    x = torch.randn(16, 4)
    _step(model, optimizer, guard, x)
    before = _snapshot(model, optimizer)
    kept, loss_finite, weights_finite = _step(model, optimizer, guard, x, poison_grads=True)
    assert (kept, loss_finite, weights_finite) == (False, True, False)
    _assert_equal(_snapshot(model, optimizer), before)


def test_the_limit_in_a_row_raises_and_a_good_step_resets_the_count():
    model, optimizer, guard = _setup(limit=2)
    x = torch.randn(16, 4)
    assert not _step(model, optimizer, guard, x * float("nan"))[0]
    assert _step(model, optimizer, guard, x)[0]
    assert not _step(model, optimizer, guard, x * float("nan"))[0]
    with pytest.raises(TrainingDiverged, match="2 steps in a row had a non-finite loss or non-finite weights"):
        _step(model, optimizer, guard, x * float("inf"))
    assert guard.total == 3
