"""Undo a training step whose loss or updated weights are not finite, and give up after too many in a row."""
from __future__ import annotations

import torch
from torch import nn

from utils import distributed


class TrainingDiverged(Exception):
    """`limit` steps in a row had to be undone (non-finite loss or non-finite weights after the update)."""

    def __init__(self, limit: int):
        super().__init__(f"{limit} steps in a row had a non-finite loss or non-finite weights after the update")
        self.limit = limit


class StepGuard:
    """Keeps what one training step can change, so that a step gone non-finite can be taken back whole.

    `save()` before the forward copies the model's buffers (BN running statistics: the forward updates them
    even when the step is then dropped), the optimised parameters and the optimiser's state. After the update,
    `verdict()` reads whether the loss and every parameter are finite, in one host sync per step (shared with
    the stop request under torchrun). `accept()` puts the copies back when they are not, counts the step, and
    raises TrainingDiverged after `limit` such steps in a row. Memory: one extra copy of the parameters, the
    optimiser state and the buffers.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, limit: int, total: int = 0,
                 in_a_row: int = 0):
        self.optimizer, self.limit, self.total, self.in_a_row = optimizer, limit, total, in_a_row
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.buffers = list(model.buffers())
        self._copies: list[torch.Tensor] | None = None
        self._had_state: set[int] = set()

    def _live(self) -> list[torch.Tensor]:
        state = [v for p in self.params for v in self.optimizer.state.get(p, {}).values() if torch.is_tensor(v)]
        return [*self.buffers, *self.params, *state]

    @torch.no_grad()
    def save(self) -> None:
        """Copy buffers, parameters and optimiser state (device copies; no host sync)."""
        live = self._live()
        self._had_state = {id(p) for p in self.params if p in self.optimizer.state}
        if self._copies is None or len(self._copies) != len(live):  # the optimiser state appears at the first step
            self._copies = [t.detach().clone() for t in live]
        else:
            torch._foreach_copy_(self._copies, live)

    @torch.no_grad()
    def restore(self) -> None:
        """Put back what save() copied; optimiser state created since then is dropped."""
        for p in self.params:
            if id(p) not in self._had_state:
                self.optimizer.state.pop(p, None)
        torch._foreach_copy_(self._live(), self._copies)

    @torch.no_grad()
    def verdict(self, loss: torch.Tensor, stop_requested: bool) -> tuple[bool, bool, bool]:
        """(loss finite, weights finite, stop requested), the same on every rank; one host sync."""
        # A NaN or inf anywhere makes its tensor's L2 norm non-finite (so would an overflow of the norm itself,
        # at magnitudes no healthy run reaches); the fused norm is several times faster than isfinite on CPU.
        weights = torch.stack(torch._foreach_norm(self.params)).isfinite().all()
        flags = torch.stack([~torch.isfinite(loss.detach().float()), ~weights]).float()
        if distributed.get_world_size() > 1:  # any rank's non-finite loss or stop request counts for all
            flags = distributed.all_reduce_sum(torch.cat([flags, flags.new_tensor([float(stop_requested)])]))
        values = flags.tolist()
        stop = values[2] > 0 if len(values) > 2 else stop_requested
        return values[0] == 0, values[1] == 0, stop

    def accept(self, loss_finite: bool, weights_finite: bool) -> bool:
        """True for a good step; otherwise undo it, count it, and raise TrainingDiverged at the limit."""
        if loss_finite and weights_finite:
            self.in_a_row = 0
            return True
        self.restore()
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row >= self.limit:
            raise TrainingDiverged(self.limit)
        return False
