"""Mixed-precision guard: similarities, softmaxes and losses always run in fp32, even under autocast."""
from __future__ import annotations

import functools

import torch


def _to_fp32(value):
    if torch.is_tensor(value) and value.is_floating_point():
        return value.float()
    return value


def in_fp32(fn):
    """Run fn with autocast off and its floating tensor arguments cast to fp32 (the result is fp32)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        args = tuple(_to_fp32(a) for a in args)
        kwargs = {k: _to_fp32(v) for k, v in kwargs.items()}
        device = next((a.device.type for a in (*args, *kwargs.values()) if torch.is_tensor(a)), "cpu")
        with torch.autocast(device_type=device, enabled=False):
            return fn(*args, **kwargs)

    return wrapper
