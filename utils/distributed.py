"""torchrun-native process groups: the same script runs as one process or as N (DDP), on one node or many."""
from __future__ import annotations

import datetime
import os
import sys
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from utils.errors import CFineError, SettingError, run_main

# Collectives wait this long for a late rank (rank 0 writing a checkpoint, a slow evaluation) before failing.
TIMEOUT = datetime.timedelta(minutes=30)


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def checked_device(device: str | torch.device) -> torch.device:
    """--device as a torch.device, refused in one line (SettingError) where this machine has no such device."""
    torch_device = torch.device(device)
    if torch_device.type == "cuda":
        if not torch.cuda.is_available():
            raise SettingError(f"--device {device} was requested but no CUDA GPU is visible; use --device cpu")
        if torch_device.index is not None and torch_device.index >= torch.cuda.device_count():
            raise SettingError(f"--device {device}: this machine has {torch.cuda.device_count()} visible GPU(s), "
                               f"numbered from 0; use --device cuda:0 ... cuda:{torch.cuda.device_count() - 1}")
    return torch_device


def init_distributed(device: str) -> tuple[DistInfo, torch.device]:
    """Join torchrun's process group if WORLD_SIZE > 1 (NCCL on CUDA, Gloo on CPU) and pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(int(os.environ.get("RANK", "0")), world_size, int(os.environ.get("LOCAL_RANK", "0")),
                    int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch_device = checked_device(device)
    if torch_device.type == "cuda":
        if info.enabled and info.local_world_size > torch.cuda.device_count():
            raise SettingError(f"torchrun started {info.local_world_size} processes on this node but it has "
                             f"{torch.cuda.device_count()} visible GPU(s): use --nproc_per_node "
                             f"{torch.cuda.device_count()} (or fewer)")
        torch_device = torch.device("cuda", info.local_rank if info.enabled else (torch_device.index or 0))
        torch.cuda.set_device(torch_device)
    if info.enabled and not dist.is_initialized():
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
        kwargs = {"device_id": torch_device} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=TIMEOUT, **kwargs)
    return info, torch_device


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def cleanup() -> None:
    """Leave the process group, all ranks together (none exits while rank 0 still writes files)."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel(model) when several processes run; the model itself otherwise.

    Every trainable parameter of CFine takes part in each loss (the MGF key bias receives an exact zero),
    so find_unused_parameters stays off; frozen tensors (logit_scale, BN biases) are ignored by DDP.
    """
    if get_world_size() == 1:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    # gradient_as_bucket_view: the gradients are views into DDP's all-reduce buckets, so no copy into and out of
    # them each step and one gradient-sized buffer less (the optimiser and StepGuard read .grad/params only).
    # static_graph stays off: the ranking loss's fallback and --gather_features keep the graph fixed, but
    # gradient accumulation or a future conditional branch would break silently under it. Buckets keep the
    # 25 MiB default: CLIP ViT-B/16 has ~150 M parameters (~600 MB of fp32 gradients, ~24 buckets), enough
    # to overlap the all-reduce with backward.
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)


def unwrap_ddp(step_model: nn.Module) -> nn.parallel.DistributedDataParallel | None:
    """The DDP wrapper inside a step model (it may be torch.compile'd), or None in a single process."""
    inner = getattr(step_model, "_orig_mod", step_model)  # torch.compile's OptimizedModule keeps the module there
    return inner if isinstance(inner, nn.parallel.DistributedDataParallel) else None


def broadcast_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (BN running statistics) to every rank, as DDP does before each training forward.

    Without --sync_bn each rank's last forward updated its own statistics; rank 0's are the ones its
    checkpoint holds, so every rank must evaluate with them.
    """
    if get_world_size() > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a copy; the tensor itself in a single process)."""
    if get_world_size() == 1:
        return tensor
    total = tensor.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def shard_range(length: int, batch_size: int, rank: int | None = None, world_size: int | None = None) -> range:
    """This rank's contiguous share of `length` items, in whole batches of the one-process batching.

    Ranks split the ceil(length / batch_size) batches into contiguous runs (sizes differ by at most one
    batch; a rank may get none), so each item is encoded in the very batch one process would use.
    """
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    batches = -(-length // batch_size)
    first, last = rank * batches // world_size, (rank + 1) * batches // world_size
    return range(min(first * batch_size, length), min(last * batch_size, length))


def gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Every rank's rows concatenated in rank order, on every rank: sizes gathered, padded to the largest, cut back.

    No sample is duplicated or dropped (unlike a padded DistributedSampler); shards may differ in size or be empty.
    """
    world_size = get_world_size()
    if world_size == 1:
        return local
    size = torch.tensor([local.shape[0]], device=local.device)
    sizes = [torch.zeros_like(size) for _ in range(world_size)]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    padded = local.new_zeros((max(sizes), *local.shape[1:]))
    padded[:local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


def run(main, args) -> int:
    """main(args) for an entry point that runs under torchrun: on one process utils/errors.py `run_main` (a
    user-facing error becomes its one line and exit status 1); on several, a failing rank prints its error (that
    line, or a traceback for anything else) and leaves at once, without waiting for its peers (they may be blocked
    in a collective): torchrun's agent stops the other ranks and reports the root cause (torch's @record handler).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return run_main(main, args)
    from torch.distributed.elastic.multiprocessing.errors import record

    rank = os.environ.get("RANK", "?")
    try:
        return record(main)(args)
    except CFineError as error:
        print(f"[rank {rank}] {error}", file=sys.stderr)
        code = 1
    except SystemExit as error:  # an explicit exit status
        if not error.code:
            return 0
        code = error.code if isinstance(error.code, int) else 1
        if not isinstance(error.code, int):
            print(f"[rank {rank}] {error.code}", file=sys.stderr)
    except BaseException:
        print(f"[rank {rank}] failed; stopping this run:", file=sys.stderr)
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
