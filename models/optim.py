"""Optimiser and per-epoch schedule of the authors' run (docs/method.md §6)."""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .cfine import CFine


def parameter_groups(
    model: CFine, *, lr_head: float = 1e-4, lr_image: float = 1e-5, lr_text: float = 1e-5, wd_image: float = 4e-5
) -> list[dict]:
    """docs/method.md §6 groups: head (new modules, BN, W), image encoder (clip.visual), text encoder (the text
    encoder's parameters, models/text_encoders/); frozen parameters (BN biases, CLIP's temperature) in none."""
    groups = {
        "head": {"name": "head", "params": [], "lr": lr_head, "weight_decay": 0.0},
        "image_encoder": {"name": "image_encoder", "params": [], "lr": lr_image, "weight_decay": wd_image},
        "text_encoder": {"name": "text_encoder", "params": [], "lr": lr_text, "weight_decay": 0.0},
    }
    owner = {id(p): group for group, params in model.encoder_parameters().items() for p in params}
    # In the model's parameter order: a saved optimiser state is matched to its parameters by position.
    for param in model.parameters():
        if param.requires_grad:
            groups[owner.get(id(param), "head")]["params"].append(param)
    return [group for group in groups.values() if group["params"]]


def epoch_lr_factor(
    epoch: int,
    warmup_epochs: int = 10,
    warmup_start: float = 0.01,
    milestones: tuple[int, ...] = (20, 25, 35),
    gamma: float = 0.1,
) -> float:
    """docs/method.md §6: linear warm-up from warmup_start over warmup_epochs, then x gamma at each milestone <= epoch."""
    if epoch < warmup_epochs:
        alpha = epoch / warmup_epochs
        warm = warmup_start * (1 - alpha) + alpha
    else:
        warm = 1.0
    return warm * gamma ** sum(1 for milestone in milestones if milestone <= epoch)


def build_optimizer(
    model: CFine,
    *,
    lr_head: float = 1e-4,
    lr_image: float = 1e-5,
    lr_text: float = 1e-5,
    wd_image: float = 4e-5,
    warmup_epochs: int = 10,
    warmup_start: float = 0.01,
    milestones: tuple[int, ...] = (20, 25, 35),
    gamma: float = 0.1,
    fused: bool | None = None,
) -> tuple[torch.optim.Adam, torch.optim.lr_scheduler.LambdaLR]:
    """docs/method.md §6 Adam (0.9, 0.999, eps 1e-8) and a LambdaLR to be stepped once per epoch.

    fused=None picks the fused implementation when every parameter is a CUDA floating tensor (one kernel per
    step, its step counters on the device: no host read of them), torch's default otherwise (foreach on CUDA,
    the per-tensor loop on CPU).
    """
    groups = parameter_groups(model, lr_head=lr_head, lr_image=lr_image, lr_text=lr_text, wd_image=wd_image)
    if fused is None:
        fused = all(p.is_cuda and p.is_floating_point() for group in groups for p in group["params"])
    optimizer = torch.optim.Adam(groups, betas=(0.9, 0.999), eps=1e-8, fused=fused or None)
    factor = functools.partial(
        epoch_lr_factor,
        warmup_epochs=warmup_epochs,
        warmup_start=warmup_start,
        milestones=tuple(milestones),
        gamma=gamma,
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
