"""utils/distributed.py's device check: a device this machine lacks is one SettingError line, on a CPU-only machine
and past the last GPU (CUDA's answers patched, so the test runs the same with or without a GPU)."""
import pytest
import torch

from utils.distributed import checked_device
from utils.errors import SettingError


def test_a_cuda_device_without_a_gpu_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert checked_device("cpu") == torch.device("cpu")
    for device in ("cuda", "cuda:0"):
        with pytest.raises(SettingError, match=rf"^--device {device} was requested but no CUDA GPU is visible; use "
                                               r"--device cpu$"):
            checked_device(device)


def test_a_gpu_index_past_the_last_gpu_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert checked_device("cuda") == torch.device("cuda") and checked_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(SettingError, match=r"^--device cuda:2: this machine has 2 visible GPU\(s\), numbered from 0; "
                                           r"use --device cuda:0 \.\.\. cuda:1$"):
        checked_device("cuda:2")
