"""Token selection of MGF (docs/method.md §2): candidates ranked by the global token's attention, top 2k split in two groups."""
from __future__ import annotations

from typing import NamedTuple

import torch


class Selection(NamedTuple):
    """Gathered tokens: ranks 1..k, ranks k+1..2k, and ranks 1..2k (B, *, D)."""

    group1: torch.Tensor
    group2: torch.Tensor
    selected: torch.Tensor


def image_candidates(batch: int, num_tokens: int, device=None) -> torch.Tensor:
    """docs/method.md §2 image candidates: every token but the class token at index 0, (B, N) bool."""
    return (torch.arange(num_tokens, device=device) != 0).expand(batch, num_tokens)


def text_candidates(global_index: torch.Tensor, length: int) -> torch.Tensor:
    """docs/method.md §2 CLIP-text candidates: every position but SOT (0) and the EOT global token; pads stay in, (B, L) bool."""
    positions = torch.arange(length, device=global_index.device).unsqueeze(0)
    return (positions != 0) & (positions != global_index.unsqueeze(1))


def global_zero_candidates(scores: torch.Tensor, global_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """docs/method.md §9 BERT-text candidates, as the authors' release: every position, the global token's ([CLS]'s)
    score multiplied by 0 rather than removed. (candidate mask (B, L) bool, scores (B, L)): [CLS] then ties with the
    zero-score [PAD]s (and, in training, tokens that attention dropout zeroed), and the stable sort ranks it first
    among them (by position; the authors' order among ties was CUDA topk's, unspecified)."""
    positions = torch.arange(scores.shape[1], device=scores.device).unsqueeze(0)
    is_global = positions == global_index.unsqueeze(1)
    return torch.ones_like(is_global), scores.masked_fill(is_global, 0.0)


def text_padding_mask(global_index: torch.Tensor, length: int) -> torch.Tensor:
    """Key padding mask for cross-attention over text: True at positions after EOT, (B, L) bool."""
    positions = torch.arange(length, device=global_index.device).unsqueeze(0)
    return positions > global_index.unsqueeze(1)


def selection_indices(scores: torch.Tensor, k: int, candidate_mask: torch.Tensor) -> torch.Tensor:
    """Positions of the 2k best candidates by score, descending, ties to the lower position: (B, 2k) long."""
    ranked = scores.masked_fill(~candidate_mask, float("-inf"))
    # A stable sort makes ties (the zero-score pads) deterministic: earlier positions rank first.
    return ranked.sort(dim=1, descending=True, stable=True).indices[:, : 2 * k]


def gather_tokens(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tokens[b, index[b, j]] for every b, j: (B, M, D)."""
    return tokens.gather(1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def select_tokens(tokens: torch.Tensor, scores: torch.Tensor, k: int, candidate_mask: torch.Tensor) -> Selection:
    """docs/method.md §2 top-k selection: group 1 = ranks 1..k, group 2 = ranks k+1..2k, selected = ranks 1..2k."""
    selected = gather_tokens(tokens, selection_indices(scores, k, candidate_mask))
    return Selection(selected[:, :k], selected[:, k:], selected)
