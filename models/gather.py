"""The global batch across DDP processes: a gradient-preserving all-gather and a BatchNorm over the global batch.

Gradient scaling, derived. With R processes, each rank r computes a loss l_r and DDP averages the
parameter gradients, so training follows J / R with J = sum_r l_r. The all-gather's backward sums the
incoming gradients of all ranks (all-reduce) and keeps this rank's slice: that is exactly dJ/dx_r,
because rank r's rows reach every rank's loss through the gather. Hence, with equal local batches b:
- a global-batch term T computed from gathered tensors (CMPM, ranking) has the same value on every rank,
  so its share of J / R is T itself: one process's update for T on the concatenated batch, unscaled;
- a per-sample mean kept local (CMPC, diversity) averages over ranks to the global-batch mean.
So no loss is rescaled. GlobalBatchNorm1d normalises with the statistics of the gathered batch, which
makes every rank's features (and the running statistics) those of one process on the whole batch.
Training batches must have the same size on every rank (the training sampler guarantees it).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather(tensor: torch.Tensor, world: int) -> torch.Tensor:
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor)
    return torch.cat(parts)


class _AllGather(torch.autograd.Function):
    """Forward: all ranks' (b, ...) tensors concatenated in rank order. Backward: all-reduce(sum), own slice.

    Hand-written because torch.distributed.nn.functional.all_gather failed the 2-process equivalence test with
    it (tests/test_distributed.py, Gloo, torch 2.14: gradients off by up to ~6e3), and it is deprecated
    (FutureWarning on every call) and refused under torch.compile; its suggested successor is private API.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        rank, world = _rank_and_world()
        ctx.rank, ctx.rows = rank, tensor.shape[0]
        return _all_gather(tensor, world)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()  # all_reduce works in place: never on autograd's own buffer
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_batch(tensor: torch.Tensor) -> torch.Tensor:
    """The global batch (R*b, ...) of all ranks in rank order; gradients reach each rank's own rows (see above).

    The identity in a single process, so code that calls it keeps its one-process numbers exactly.
    """
    world = _rank_and_world()[1]
    if world == 1:
        return tensor
    return _AllGather.apply(tensor) if tensor.requires_grad else _all_gather(tensor, world)


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are those of the global batch of all DDP ranks (--sync_bn).

    Gathers the (b, D) inputs, normalises the whole (R*b, D) batch exactly as one process would (same
    running-average update on every rank), and returns this rank's rows. Works with Gloo and NCCL; the
    state dict is BatchNorm1d's, so checkpoints load into the plain model. Eval mode is BatchNorm1d's.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rank, world = _rank_and_world()
        if world == 1 or not self.training:
            return super().forward(x)
        rows = x.shape[0]
        return super().forward(gather_batch(x))[rank * rows:(rank + 1) * rows]


def convert_to_global_bn(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm1d inside module by a GlobalBatchNorm1d holding the same parameters and buffers."""
    if type(module) is nn.BatchNorm1d:
        converted = GlobalBatchNorm1d(module.num_features, module.eps, module.momentum, module.affine,
                                      module.track_running_stats)
        # The same Parameter and buffer objects: optimisers and state-dict keys are unaffected.
        for name, param in module.named_parameters(recurse=False):
            setattr(converted, name, param)
        for name, buffer in module.named_buffers(recurse=False):
            setattr(converted, name, buffer)
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        setattr(module, name, convert_to_global_bn(child))
    return module
