"""Batch-by-batch similarities of CFR (docs/method.md §3) and FCD (docs/method.md §4), as matrix products over the batch."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .precision import in_fp32


def _soft_max_pool(scores: torch.Tensor) -> torch.Tensor:
    """sum_n softmax_n(s) * s_n over the last axis: a softly weighted maximum."""
    return (scores.softmax(dim=-1) * scores).sum(dim=-1)


@in_fp32
def cross_grained_similarity(
    img_global: torch.Tensor,
    img_selected: torch.Tensor,
    txt_global: torch.Tensor,
    txt_selected: torch.Tensor,
    tau: float = 0.07,
) -> torch.Tensor:
    """docs/method.md §3 CFR: sim_cs = (image-word + patch-text) / 2, (B, B) with rows images and columns texts."""
    img_global, img_selected = F.normalize(img_global, dim=-1), F.normalize(img_selected, dim=-1)
    txt_global, txt_selected = F.normalize(txt_global, dim=-1), F.normalize(txt_selected, dim=-1)
    image_word = torch.einsum("id,jwd->ijw", img_global, txt_selected) / tau  # (B, B, 2k_txt)
    patch_text = torch.einsum("ipd,jd->ijp", img_selected, txt_global) / tau  # (B, B, 2k_img)
    return (_soft_max_pool(image_word) + _soft_max_pool(patch_text)) / 2


def _mean_of_top(sources: torch.Tensor, affinity: torch.Tensor, k: int) -> torch.Tensor:
    """For each row r of affinity (B, R, S): normalise(mean of sources[b, s] over its top-k s), (B, R, D)."""
    top = affinity.topk(min(k, affinity.shape[-1]), dim=-1).indices
    # Averaging through a sparse weight matrix keeps it one batched matmul (no B x R x k x D gather).
    weights = torch.zeros_like(affinity).scatter_(-1, top, 1.0 / top.shape[-1])
    return F.normalize(weights @ sources, dim=-1)


@in_fp32
def fine_grained_similarity(
    img_patches: torch.Tensor,
    txt_words: torch.Tensor,
    k_word: int = 3,
    k_patch: int = 3,
    tau: float = 0.01,
) -> torch.Tensor:
    """docs/method.md §4 FCD: sim_cd = (patch-to-positive-word + positive-patch-to-word) / 2, (B, B).

    k_word / k_patch are capped at the number of words / patches (only tiny test models have fewer than 3).
    """
    patches, words = F.normalize(img_patches, dim=-1), F.normalize(txt_words, dim=-1)
    affinity = (patches @ words.transpose(1, 2)).softmax(dim=-1)  # A_i: (B, P, W), softmax over words
    positive_word = _mean_of_top(txt_words, affinity, k_word)  # (B, P, D)
    positive_patch = _mean_of_top(img_patches, affinity.transpose(1, 2), k_patch)  # (B, W, D)
    batch, num_patches, num_words = affinity.shape
    patch_word = patches.reshape(batch, -1) @ positive_word.reshape(batch, -1).T / (num_patches * tau)
    word_patch = positive_patch.reshape(batch, -1) @ words.reshape(batch, -1).T / (num_words * tau)
    return (patch_word + word_patch) / 2
