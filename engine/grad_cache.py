"""One training step's loss and gradients: whole, or by gradient caching with encoder activations for one chunk
at a time (Gao et al., "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup", 2021).

CFine's objectives couple the whole batch (CMPM's softmax over it, hardest-negative mining, BN statistics, the
CFR/FCD matrices), so gradient accumulation over small batches would change the method. Gradient caching keeps
it: with `chunk_size` the step
  (a) encodes the batch chunk by chunk without autograd, keeping every chunk's tokens and attention rows;
  (b) runs the head and every loss once on the whole batch, the cached tokens as leaves, and backpropagates:
      the head's parameters get their gradients, the cached tokens theirs;
  (c) encodes each chunk again, now with autograd, and backpropagates its cached token gradients into the
      encoders' weights.
The loss and every gradient are those of the whole-batch step (in bert mode with dropout: under the masks the
chunks draw, which are not the whole batch's); the encoders' activations exist for one chunk at a time (the
price: each chunk is encoded twice). The attention rows only rank tokens for the selection (no
gradient flows through a sort), so (c) needs the tokens' gradients alone. Dropout (BERT) draws the same masks in
(a) and (c): each chunk is re-encoded from the RNG state it first started from.
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch
from torch import nn

from clip.model import TokenFeatures
from models.head import CFineOutput
from utils.distributed import unwrap_ddp


def forward_backward(step_model: nn.Module, images: torch.Tensor, tokens: torch.Tensor, pids: torch.Tensor, *,
                     precision: Callable[[], ContextManager], scale: Callable[[torch.Tensor], torch.Tensor],
                     chunk_size: int | None = None) -> CFineOutput:
    """The step's CFineOutput, with the gradients of its loss accumulated into the parameters' .grad.

    step_model: CFine, or its DDP wrapper, or either compiled; precision(): the autocast context; scale: the
    GradScaler's scale (identity without fp16). chunk_size None, or not below the batch (a single chunk saves
    nothing): one forward and backward of the whole batch.
    """
    if chunk_size is None or chunk_size >= images.shape[0]:
        with precision():
            out = step_model(images, tokens, pids)
        scale(out.loss).backward()
        return out
    return _cached_forward_backward(step_model, images, tokens, pids, precision, scale, chunk_size)


def _cached_forward_backward(step_model, images, tokens, pids, precision, scale, chunk_size) -> CFineOutput:
    ddp = unwrap_ddp(step_model)
    no_sync = ddp.no_sync if ddp is not None else contextlib.nullcontext
    chunks = [slice(start, start + chunk_size) for start in range(0, images.shape[0], chunk_size)]

    # (a) the whole batch's encoder outputs, one chunk's activations at a time; each chunk's RNG state kept.
    starts, encoded = [], []
    with torch.no_grad(), precision():
        for rows in chunks:
            starts.append(_rng_state(images.device))
            encoded.append(step_model(images[rows], tokens[rows], stage="encoders"))
    image, text = (_cached_leaves([pair[side] for pair in encoded]) for side in (0, 1))
    del encoded

    # (b) head and losses on the whole batch; backward fills the head's gradients and the cached tokens'.
    # Under DDP no_sync: the gradients are all-reduced once, in the last chunk's backward below.
    with no_sync(), precision():
        out = step_model(image, text, pids, stage="head")
    scale(out.loss).backward()

    # (c) each chunk again with autograd; its cached token gradients flow into the encoders.
    head_touch = _zero_touch(ddp.module.head) if ddp is not None else None
    for n, rows in enumerate(chunks):
        last = n == len(chunks) - 1
        with contextlib.nullcontext() if last else no_sync():
            _set_rng_state(starts[n], images.device)
            with precision():
                image_chunk, text_chunk = step_model(images[rows], tokens[rows], stage="encoders")
            outputs = [image_chunk.tokens, text_chunk.tokens]
            gradients = [image.tokens.grad[rows], text.tokens.grad[rows]]
            if last and head_touch is not None:
                # DDP all-reduces in the backward of a synchronised forward, and only once every parameter's
                # gradient hook has fired: a zero gradient makes the head's (complete since (b)) take part.
                outputs.append(head_touch())
                gradients.append(None)
            torch.autograd.backward(outputs, gradients)
    # The RNG is where (a) left it, as if each chunk had been encoded once: the last chunk's re-encoding ends there
    # (the head draws no random numbers; tests/test_engine_grad_cache.py checks the stream).
    return out


def _cached_leaves(parts: list[TokenFeatures]) -> TokenFeatures:
    """The chunks' outputs as one batch; the tokens a leaf whose .grad the head's backward fills."""
    padding = None if parts[0].padding_mask is None else torch.cat([p.padding_mask for p in parts])
    return TokenFeatures(torch.cat([p.tokens for p in parts]).requires_grad_(),
                         torch.cat([p.global_attention for p in parts]),
                         torch.cat([p.global_index for p in parts]), padding)


def _zero_touch(module: nn.Module) -> Callable[[], torch.Tensor]:
    """A function giving a scalar that is 0 and whose backward adds a zero gradient to every trainable parameter."""
    params = [p for p in module.parameters() if p.requires_grad]
    return lambda: sum(p.flatten()[:0].sum() for p in params)


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The CPU generator's state and the device's (torch.random.fork_rng only restores on exit; this rewinds)."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
