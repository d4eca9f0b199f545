"""No host-device synchronisation in a training step: forward, losses, backward and the optimiser step.

On a GPU every read of a device value by the host (`.item()`, a 0-dim tensor used as an index, `nonzero`,
`if tensor:`) stalls the CPU until the queue drains; the step would then run at the speed of its launches.
These tests count the ATen calls that read device values, on CPU, where they are dispatched the same way.
StepGuard.check's one read per step, between the backward and the optimiser step, is the allowed one and is
not in the window (tests/test_engine_step_guard.py counts it).
"""
from __future__ import annotations

import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from clip.config import CLIPConfig
from engine.grad_cache import forward_backward
from models.cfine import CFine
from models.config import CFineConfig
from models.optim import build_optimizer
from models.precision import autocast
from tests.conftest import random_caption_ids
from tests.tolerance import skip_bf16_attention_if_forced_default

SYNCING = {torch.ops.aten._local_scalar_dense, torch.ops.aten.item, torch.ops.aten.nonzero, torch.ops.aten.is_nonzero}
# torch.tensor(python data): on a GPU a pageable host-to-device copy, which waits for the host every step.
FROM_PYTHON = {torch.ops.aten.lift_fresh}


class HostReads(TorchDispatchMode):
    """Records every dispatched op that reads a tensor's value on the host, or builds a tensor from Python data."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in SYNCING | FROM_PYTHON:
            caller = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename][-1]
            self.calls.append(f"{func} at {caller.filename}:{caller.lineno} ({caller.line})")
        return func(*args, **(kwargs or {}))


def one_step_reads(model: CFine, tokens: torch.Tensor, amp: str, chunk_size: int | None = None) -> list[str]:
    """The host reads of the second training step (the first creates the optimiser state) of a batch of 8
    (chunk_size: by gradient caching, engine/grad_cache.py)."""
    torch.manual_seed(0)
    # Fused Adam as on CUDA (models/optim.py); torch's CPU default reads its CPU step counter with .item(),
    # which is no device sync, so it would only hide the rest of the step here.
    optimizer, _ = build_optimizer(model, fused=True)
    batch = tokens.shape[0]
    images = torch.randn(batch, 3, *model.config.clip.vision.image_size)
    pids = torch.arange(batch) % 4  # two pairs per identity: the ranking loss and its fallback both run
    model.train()
    for _ in range(2):
        with HostReads() as reads:
            optimizer.zero_grad(set_to_none=True)
            out = forward_backward(model, images, tokens, pids, precision=lambda: autocast(torch.device("cpu"), amp),
                                   scale=lambda loss: loss, chunk_size=chunk_size)
            optimizer.step()
    assert torch.isfinite(out.loss)
    return reads.calls


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("amp", ["off", pytest.param("bf16", marks=skip_bf16_attention_if_forced_default)])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_clip_mode_training_step_reads_nothing_on_the_host(amp, chunk_size):
    torch.manual_seed(0)
    model = CFine(CFineConfig(clip=CLIPConfig.tiny((64, 32)), num_classes=10))
    assert one_step_reads(model, random_caption_ids(8), amp, chunk_size) == []


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("switches", [
    {"mgf": False},  # tokens selected for CFR and FCD, no MGF
    {"cfr": False},
    {"mgf": False, "cfr": False, "fcd": False, "loss_weights": {"diversity_weight": 0.0, "ranking_weight": 0.0}},
], ids=["mgf_off", "cfr_off", "baseline"])
def test_ablation_training_steps_read_nothing_on_the_host(switches):
    torch.manual_seed(0)
    model = CFine(CFineConfig(clip=CLIPConfig.tiny((64, 32)), num_classes=10, **switches))
    assert one_step_reads(model, random_caption_ids(8), "off") == []


def test_the_recorder_sees_the_reads_it_is_meant_to_catch():
    x = torch.arange(4.0)
    with HostReads() as reads:
        x[x.argmax()]  # a 0-dim index tensor: read on the host
        x.sum().item()
        bool(x.any())
        x.nonzero()
        torch.tensor([1.0, 2.0])
    assert len(reads.calls) == 5, reads.calls


@pytest.mark.usefixtures("single_thread")
def test_bert_mode_reads_on_the_host_only_inside_transformers():
    """Bert mode (docs/method.md §9): CFine's own code reads nothing; any read left is Hugging Face BertModel's own.

    Measured with transformers 5.24: one read per forward, `padding_mask.all()` in masking_utils.py (it decides
    whether the attention mask can be dropped). That is transformers' code and stays as it is.
    """
    pytest.importorskip("transformers")
    from models.text_encoders.bert import architecture
    from tests.bert_fixtures import tiny_bert_config, tiny_vocab

    torch.manual_seed(0)
    config = CFineConfig(clip=CLIPConfig.tiny((64, 32)).vision_only(), text_encoder="bert",
                         bert=architecture(tiny_bert_config().to_dict()), num_classes=10)
    model = CFine(config, text_vocab="\n".join(tiny_vocab()) + "\n")
    tokens = model.tokenize(["a man in a red coat", "a woman with a bag and long dark hair"] * 4)
    reads = one_step_reads(model, tokens, "off")
    assert [call for call in reads if "/transformers/" not in call] == []


def test_the_device_side_input_transform_reads_nothing_on_the_host():
    from datasets.transforms import to_model_input

    images = torch.randint(0, 256, (8, 3, 16, 8), dtype=torch.uint8)
    flips = torch.arange(8) % 2 == 0
    to_model_input(images, "clip", flips)  # the first call makes the cached mean/std tensors
    with HostReads() as reads:
        to_model_input(images, "clip", flips)
    assert reads.calls == []
