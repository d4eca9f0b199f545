"""engine/step_guard.py with engine/loop.py's guarded_update: a step with a non-finite loss or gradients is skipped
before the optimiser step; weights, Adam state and BN statistics stay as they were."""
import copy

import pytest
import torch
from torch import nn

from engine.loop import guarded_update
from engine.step_guard import StepGuard, TrainingDiverged
from tests.test_sync_free import HostReads


def _setup(limit=3, fused=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, fused=fused)
    return model, optimizer, StepGuard(model, limit)


def _step(model, optimizer, guard, x, poison=None, scaler=None):
    """One guarded training step, as engine/loop.py takes it; returns StepGuard.check's (loss finite, gradients
    finite, stop requested). poison: a NaN or inf put into one gradient after the backward."""
    scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)
    guard.save_buffers()
    optimizer.zero_grad(set_to_none=True)
    loss = model(x).pow(2).mean()
    scaler.scale(loss).backward()
    if poison is not None:
        model[0].weight.grad[0, :1].fill_(poison)  # fill_, not `grad[0, 0] = x`: no tensor from Python data
    return guarded_update(optimizer, scaler, guard, loss, False)


def _kept(flags):
    return flags[0] and flags[1]


def _snapshot(model, optimizer):
    return copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())


def _assert_equal(a, b):
    (model_a, opt_a), (model_b, opt_b) = a, b
    assert model_a.keys() == model_b.keys() and all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for p in opt_a["state"]:
        assert opt_a["state"][p].keys() == opt_b["state"][p].keys() == {"step", "exp_avg", "exp_avg_sq"}
        for k in opt_a["state"][p]:
            assert torch.equal(opt_a["state"][p][k], opt_b["state"][p][k]), (p, k)


@pytest.mark.parametrize("first_step", [True, False])
def test_a_nan_batch_leaves_bn_statistics_weights_and_adam_state_as_they_were(first_step):
    model, optimizer, guard = _setup()
    x = torch.randn(16, 4)
    if not first_step:
        assert _kept(_step(model, optimizer, guard, x))
    before = _snapshot(model, optimizer)
    loss_finite, grads_finite, _ = _step(model, optimizer, guard, x * float("nan"))
    assert (loss_finite, grads_finite) == (False, False)
    _assert_equal(_snapshot(model, optimizer), before)  # BN running_mean/var/num_batches_tracked included
    assert (guard.in_a_row, guard.total) == (1, 1)
    assert _kept(_step(model, optimizer, guard, x)) and guard.in_a_row == 0 and guard.total == 1


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_gradients_after_a_finite_loss_skip_the_step(poison):
    model, optimizer, guard = _setup()
    x = torch.randn(16, 4)
    _step(model, optimizer, guard, x)
    before = _snapshot(model, optimizer)
    assert _step(model, optimizer, guard, x, poison=poison) == (True, False, False)
    # The forward ran and moved the BN statistics; the skip put them back.
    _assert_equal(_snapshot(model, optimizer), before)
    assert (guard.in_a_row, guard.total) == (1, 1)


def test_a_good_step_changes_weights_adam_state_and_bn_statistics():
    model, optimizer, guard = _setup()
    x = torch.randn(16, 4)
    _step(model, optimizer, guard, x)
    (model_before, opt_before) = _snapshot(model, optimizer)
    assert _step(model, optimizer, guard, x) == (True, True, False)
    model_after, opt_after = _snapshot(model, optimizer)
    assert all(not torch.equal(model_before[k], model_after[k]) for k in model_after)  # every weight and buffer
    for p in opt_after["state"]:
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert not torch.equal(opt_before["state"][p][k], opt_after["state"][p][k]), (p, k)
    assert (guard.in_a_row, guard.total) == (0, 0)


def test_the_limit_in_a_row_raises_and_a_good_step_resets_the_count():
    model, optimizer, guard = _setup(limit=2)
    x = torch.randn(16, 4)
    assert not _kept(_step(model, optimizer, guard, x * float("nan")))
    assert _kept(_step(model, optimizer, guard, x))
    assert not _kept(_step(model, optimizer, guard, x, poison=float("nan")))
    with pytest.raises(TrainingDiverged, match="^2 steps in a row had a non-finite loss or gradients$"):
        _step(model, optimizer, guard, x * float("inf"))
    assert (guard.in_a_row, guard.total) == (2, 3)


def test_the_counts_carry_over_from_a_checkpoint():
    model, optimizer, _ = _setup()
    guard = StepGuard(model, limit=3, total=5, in_a_row=2)
    with pytest.raises(TrainingDiverged, match="^3 steps in a row"):
        _step(model, optimizer, guard, torch.randn(16, 4) * float("nan"))
    assert (guard.in_a_row, guard.total) == (3, 6)


def test_fp16_the_guard_checks_unscaled_gradients_and_a_skip_lowers_the_scale():
    model, optimizer, guard = _setup()
    plain, plain_optimizer, plain_guard = _setup()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    x = torch.randn(16, 4)
    assert _kept(_step(model, optimizer, guard, x, scaler=scaler))
    assert _kept(_step(plain, plain_optimizer, plain_guard, x))
    # The update used the unscaled gradients: the same step as without a scaler (2^10 scales exactly).
    _assert_equal(_snapshot(model, optimizer), _snapshot(plain, plain_optimizer))
    assert scaler.get_scale() == 2.0**11  # a good step: grown (growth_interval 1)

    before = _snapshot(model, optimizer)
    assert _step(model, optimizer, guard, x, poison=float("inf"), scaler=scaler) == (True, False, False)
    _assert_equal(_snapshot(model, optimizer), before)
    assert scaler.get_scale() == 2.0**10  # update() after unscale_ alone: the skip halved the scale
    assert _kept(_step(model, optimizer, guard, x, scaler=scaler)) and guard.in_a_row == 0


@pytest.mark.parametrize("fault", [None, "loss", "grads"])
def test_the_check_is_the_steps_one_host_read(fault):
    """Fused Adam as on CUDA (torch's CPU default reads its CPU step counter with .item(): no device sync)."""
    model, optimizer, guard = _setup(fused=True)
    x = torch.randn(16, 4)
    _step(model, optimizer, guard, x)  # creates the Adam state and the buffer copies
    batch = x * float("nan") if fault == "loss" else x
    with HostReads() as reads:
        flags = _step(model, optimizer, guard, batch, poison=float("nan") if fault == "grads" else None)
    assert _kept(flags) == (fault is None)
    assert len(reads.calls) == 1, reads.calls
    assert "_local_scalar_dense" in reads.calls[0] and "engine/step_guard.py" in reads.calls[0], reads.calls


def test_a_model_without_buffers_or_gradients_is_guarded_too():
    model = nn.Linear(4, 1)
    guard = StepGuard(model, limit=2)
    guard.save_buffers()
    assert guard.check(torch.tensor(1.0), True) == (True, True, True)  # no gradients yet
    guard.skip()
    assert (guard.in_a_row, guard.total) == (1, 1)
