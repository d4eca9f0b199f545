"""Gradient caching (engine/grad_cache.py): the chunked step gives the whole-batch step's loss, gradients and BN
statistics; BERT's dropout replays its masks; bf16, a gradient scaler and torch.compile work chunked."""
from __future__ import annotations

import copy

import pytest
import torch

from clip.config import CLIPConfig
from clip.model import TokenFeatures
from engine import grad_cache
from engine.grad_cache import forward_backward
from models.cfine import CFine
from models.config import CFineConfig
from models.precision import autocast
from tests.conftest import random_caption_ids
from tests.tolerance import assert_close, assert_each_close, relative_errors, skip_bf16_attention_if_forced_default

pytestmark = pytest.mark.usefixtures("single_thread")
BATCH = 16


def clip_model(seed: int = 0) -> CFine:
    torch.manual_seed(seed)
    return CFine(CFineConfig(clip=CLIPConfig.tiny((64, 32)), num_classes=10)).train()


def bert_model(dropout: float = 0.1) -> CFine:
    pytest.importorskip("transformers")
    from models.text_encoders.bert import architecture
    from tests.bert_fixtures import tiny_bert_config, tiny_vocab

    bert = architecture(tiny_bert_config().to_dict()) | {"hidden_dropout_prob": dropout,
                                                         "attention_probs_dropout_prob": dropout}
    torch.manual_seed(0)
    config = CFineConfig(clip=CLIPConfig.tiny((64, 32)).vision_only(), text_encoder="bert", bert=bert, num_classes=10)
    return CFine(config, text_vocab="\n".join(tiny_vocab()) + "\n").train()


def batch(model: CFine, size: int = BATCH):
    """Images, token ids and identities (pairs of the same id, so every loss and the ranking fallback run)."""
    images = torch.randn(size, 3, 64, 32, generator=torch.Generator().manual_seed(1))
    if model.config.text_encoder == "bert":
        words = ["a man in a red coat", "a woman with a long dark bag", "the girl is wearing blue jeans and shoes",
                 "an old person carrying a black backpack"]
        tokens = model.tokenize([words[i % 4] + " and" * (i % 5) for i in range(size)])
    else:
        tokens = random_caption_ids(size)
    return images, tokens, torch.arange(size) % (size // 2)


def step(model: CFine, data, chunk_size=None, amp="off", scale=lambda loss: loss, seed=5, step_model=None):
    """One forward_backward from a fixed RNG state: the loss, each parameter's gradient, the buffers after."""
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    out = forward_backward(model if step_model is None else step_model, *data, precision=lambda: autocast(torch.device("cpu"), amp),
                           scale=scale, chunk_size=chunk_size)
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach().float(), grads, {k: v.clone() for k, v in model.named_buffers()}


# A tensor whose exact gradient is 0 (the MGF key bias, the bias before a BN) holds rounding noise only: it is
# measured against 1e-3 of the largest gradient of all (tests/tolerance.py).
FLOOR = 1e-3


def assert_same_step(chunked, whole, tolerance=5e-5):
    """Loss and every gradient within `tolerance` of the whole-batch step's, relative (fp32 roundings of other
    summation orders: the chunks are other matrix shapes; measured at most 3.1e-6 over the CPU settings of
    tests/tolerance.py)."""
    assert_close(chunked[0], whole[0], tolerance, what="loss")
    assert_each_close(chunked[1], whole[1], tolerance, floor=FLOOR, what="grad")


# ---------------------------------------------------------------- exactness in fp32


@pytest.mark.parametrize("chunk_size", [4, 5, 1, 15])  # 5: chunks of 5, 5, 5 and 1
def test_clip_mode_chunked_step_equals_the_whole_batch_step(chunk_size):
    model = clip_model()
    data = batch(model)
    whole = step(copy.deepcopy(model), data)  # copies: BN statistics start equal and are updated once each
    chunked = step(copy.deepcopy(model), data, chunk_size)
    assert_same_step(chunked, whole)
    # BN running statistics: the head saw the whole batch once (its features encoded in chunks: other matrix shapes,
    # so fp32 roundings, and MKL's AVX2 kernels do round them differently; relative to each statistic's largest entry).
    assert_each_close(chunked[2], whole[2], 1e-6, what="buffer")  # measured at most 9.9e-8


def test_the_exactness_check_can_fail():
    """A head fed chunk by chunk (gradient accumulation) is another method: the same check rejects it."""
    model = clip_model()
    images, tokens, pids = batch(model)
    whole = step(model, (images, tokens, pids))
    model.zero_grad(set_to_none=True)
    for rows in (slice(0, 8), slice(8, 16)):
        (model(images[rows], tokens[rows], pids[rows]).loss / 2).backward()
    accumulated = (whole[0], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    with pytest.raises(AssertionError):
        assert_same_step(accumulated, whole)


def test_bert_mode_without_dropout_equals_the_whole_batch_step():
    model = bert_model(dropout=0.0)
    data = batch(model)
    assert_same_step(step(model, data, chunk_size=4), step(model, data))


def chunkwise_reference(model: CFine, data, chunk_size: int, seed: int = 5):
    """The gradients of the loss under the dropout masks the chunked step draws: every chunk encoded once with
    autograd (the RNG advancing chunk after chunk, as in the chunked step's first pass), one head, one backward."""
    images, tokens, pids = data
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    parts = [model(images[i:i + chunk_size], tokens[i:i + chunk_size], stage="encoders")
             for i in range(0, images.shape[0], chunk_size)]
    image, text = (TokenFeatures(*(None if parts[0][side][field] is None else torch.cat([p[side][field] for p in parts])
                                   for field in range(4))) for side in (0, 1))
    out = model(image, text, pids, stage="head")
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_bert_dropout_draws_the_same_masks_in_both_passes(monkeypatch):
    model = bert_model(dropout=0.1)
    data = batch(model)
    reference = chunkwise_reference(model, data, 4)
    assert_same_step(step(model, data, chunk_size=4), reference)
    # Without the RNG rewind the second pass draws other masks: the check sees it.
    monkeypatch.setattr(grad_cache, "_set_rng_state", lambda state, device: None)
    with pytest.raises(AssertionError):
        assert_same_step(step(model, data, chunk_size=4), reference)


def test_the_rng_goes_on_as_after_one_encoding_per_chunk():
    model = bert_model(dropout=0.1)
    data = batch(model)
    step(model, data, chunk_size=4)
    after_chunked = torch.rand(3)
    chunkwise_reference(model, data, 4)
    torch.testing.assert_close(after_chunked, torch.rand(3), rtol=0, atol=0)


# ---------------------------------------------------------------- mixed precision, scaling, compile


def assert_as_close_to_fp32(chunked, whole, fp32):
    """Reduced precision: the chunked step's gradients are as far from fp32's as the whole-batch step's (10% margin:
    the same roundings in another order; measured 0.99x for bf16 and 1.001x for fp16)."""
    whole_error = max(relative_errors(whole[1], fp32[1], FLOOR).values())  # what the precision itself costs
    chunked_error = max(relative_errors(chunked[1], fp32[1], FLOOR).values())
    assert 1e-3 < whole_error < 0.5  # reduced precision did run, and it is not broken
    assert chunked_error <= 1.1 * whole_error, (chunked_error, whole_error)
    loss_error = abs(float(whole[0] - fp32[0]))
    assert abs(float(chunked[0] - fp32[0])) <= 1.1 * loss_error + 1e-6 * abs(float(fp32[0]))


@skip_bf16_attention_if_forced_default
def test_bf16_chunked_step_is_as_close_to_fp32_as_the_whole_bf16_step():
    model = clip_model()
    data = batch(model)
    assert_as_close_to_fp32(step(model, data, chunk_size=4, amp="bf16"), step(model, data, amp="bf16"), step(model, data))


def unscaled_gradients(model: CFine, scaler: torch.amp.GradScaler) -> dict[str, torch.Tensor]:
    """The gradients after scaler.unscale_, as scaler.step sees them."""
    scaler.unscale_(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0))
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def fp16_step(model, data, chunk_size=None):
    """An fp16 autocast step scaled by a GradScaler (16: the largest power of 2 that does not overflow this tiny
    model's fp16 gradients), then unscaled as scaler.step does: the loss and the unscaled gradients."""
    scaler = torch.amp.GradScaler("cpu", init_scale=16.0)
    loss, scaled, _ = step(model, data, chunk_size, amp="fp16", scale=scaler.scale)
    assert all(torch.isfinite(g).all() for g in scaled.values())
    return loss, unscaled_gradients(model, scaler)


def test_fp16_chunked_step_with_a_gradient_scaler_is_as_close_to_fp32_as_the_whole_fp16_step():
    model = clip_model()
    data = batch(model)
    chunked, whole = fp16_step(model, data, 4), fp16_step(model, data)
    assert_as_close_to_fp32(chunked, whole, step(model, data))  # a scale applied twice would be 16x off


def test_a_gradient_scaler_scales_every_gradient_once_in_fp32():
    model = clip_model()
    data = batch(model)
    whole = step(model, data)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    loss = step(model, data, chunk_size=4, scale=scaler.scale)[0]
    assert_same_step((loss, unscaled_gradients(model, scaler)), whole)


def test_compiled_chunked_step_equals_eager():
    model = clip_model()
    data = batch(model)
    eager = step(model, data, chunk_size=5)
    compiled = torch.compile(model, backend="aot_eager")
    assert_same_step(step(model, data, chunk_size=5, step_model=compiled), eager, tolerance=1e-4)


def test_an_unknown_stage_is_an_error():
    model = clip_model()
    with pytest.raises(ValueError, match="stage 'encoder' is unknown"):
        model(*batch(model, 4), stage="encoder")
