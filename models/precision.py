"""How the model's arithmetic runs: the --amp modes (autocast; docs/training.md), torch.compile, and the fp32 guard
(similarities, softmaxes and losses always run in fp32, even under autocast)."""
from __future__ import annotations

import functools

import torch

from utils.errors import SettingError


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


def resolve_amp(mode: str, device: torch.device) -> str:
    """'auto' -> bf16 on GPUs that support it, fp16 on older GPUs, off on CPU; explicit modes are checked."""
    if mode == "auto":
        if device.type != "cuda":
            return "off"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if mode == "fp16" and device.type != "cuda":
        raise SettingError("--amp fp16 needs a CUDA device (CPU autocast supports bf16): use --amp bf16 or off")
    return mode


def autocast(device: torch.device, mode: str) -> torch.autocast:
    """torch.autocast for an --amp mode ('bf16', 'fp16'; 'off' disables it)."""
    return torch.autocast(device.type, dtype=torch.float16 if mode == "fp16" else torch.bfloat16, enabled=mode != "off")


def use_tf32(mode: str) -> None:
    """--tf32 on|off: whether CUDA runs float32 matrix products and convolutions as TF32 (Ampere and newer GPUs;
    PyTorch 1.7's default, under which the authors' fp32 run was a TF32 run: docs/faithfulness.md). No effect on CPU."""
    enabled = {"on": True, "off": False}[mode]
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def compiled(fn, backend: str = "off"):
    """torch.compile(fn) with that backend ('inductor', 'aot_eager'); fn itself for 'off'."""
    return fn if backend == "off" else torch.compile(fn, backend=backend)
