"""Skip a training step whose loss or gradients are not finite, and give up after too many in a row."""
from __future__ import annotations

import torch
from torch import nn

from utils import distributed


class TrainingDiverged(Exception):
    """`limit` steps in a row were skipped for a non-finite loss or non-finite gradients."""

    def __init__(self, limit: int):
        super().__init__(f"{limit} steps in a row had a non-finite loss or gradients")
        self.limit = limit


class StepGuard:
    """Decides, before the optimiser step, whether a step is applied or skipped, so a bad step never reaches the
    weights or the optimiser state; keeps the model's running statistics as they were before a skipped step.

    Per step: `save_buffers()` before the forward copies the buffers a forward changes (BN running statistics and
    their counters) into copies made once; `check()` after the backward (and, with fp16, after the scaler's
    unscale_) reads whether the loss and every gradient are finite, in one host sync (shared with the stop request,
    and the same on every rank under torchrun); for a bad step the caller does not call optimizer.step() and calls
    `skip()`, which puts the buffers back, counts the step and raises TrainingDiverged after `limit` in a row.
    Memory: one copy of the buffers (for CFine two BN layers' statistics, a few KiB).
    """

    def __init__(self, model: nn.Module, limit: int, total: int = 0, in_a_row: int = 0):
        self.limit, self.total, self.in_a_row = limit, total, in_a_row
        self.params = [p for p in model.parameters() if p.requires_grad]
        # Integer buffers other than BN's step counter (masks, index tables) are constants of the model.
        self.buffers = [b for name, b in model.named_buffers()
                        if b.is_floating_point() or name.rsplit(".", 1)[-1] == "num_batches_tracked"]
        self._copies: list[torch.Tensor] | None = None

    @torch.no_grad()
    def save_buffers(self) -> None:
        """Copy the buffers into the guard's copies (device copies; no host sync)."""
        if self._copies is None:
            self._copies = [b.detach().clone() for b in self.buffers]
        elif self.buffers:
            torch._foreach_copy_(self._copies, self.buffers)

    @torch.no_grad()
    def check(self, loss: torch.Tensor, stop_requested: bool) -> tuple[bool, bool, bool]:
        """(loss finite, gradients finite, stop requested), the same on every rank; the step's one host sync.

        A finite step ends a run of skipped ones (in_a_row back to 0).
        """
        bad_loss = ~torch.isfinite(loss.detach().float())
        grads = [p.grad for p in self.params if p.grad is not None]  # new tensors each step (zero_grad sets None)
        # A NaN or inf anywhere makes its tensor's L2 norm non-finite (so would an overflow of the norm itself, at
        # magnitudes no healthy run reaches): one fused reduction over all gradients, not an isfinite per tensor.
        bad_grads = ~torch.stack(torch._foreach_norm(grads)).isfinite().all() if grads else torch.zeros_like(bad_loss)
        flags = [bad_loss, bad_grads]
        if distributed.get_world_size() > 1:  # any rank's bad step or stop request counts for all
            # full_like fills on the device: no host-to-device copy of Python data.
            stop = torch.full_like(bad_loss, stop_requested, dtype=torch.float)
            flags = list(distributed.all_reduce_sum(torch.stack([bad_loss.float(), bad_grads.float(), stop])) > 0)
        code = int(sum(flag.int() << bit for bit, flag in enumerate(flags)).item())  # the one read: all flags as bits
        loss_finite, grads_finite = not code & 1, not code & 2
        stopping = bool(code & 4) if len(flags) > 2 else stop_requested
        if loss_finite and grads_finite:
            self.in_a_row = 0
        return loss_finite, grads_finite, stopping

    @torch.no_grad()
    def skip(self) -> None:
        """Count a skipped step and put back the buffers its forward changed; TrainingDiverged at the limit."""
        if self._copies is not None and self.buffers:
            torch._foreach_copy_(self.buffers, self._copies)
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row >= self.limit:
            raise TrainingDiverged(self.limit)
