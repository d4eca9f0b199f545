"""BN bottleneck of docs/method.md §2: one BatchNorm1d per modality, bias frozen at 0, shared by its three features."""
from __future__ import annotations

import torch
from torch import nn


def make_bottleneck(width: int) -> nn.BatchNorm1d:
    """BatchNorm1d(D) with weight 1 and a frozen zero bias (docs/method.md §2)."""
    bn = nn.BatchNorm1d(width)
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)
    bn.bias.requires_grad_(False)
    return bn


def apply_bottleneck(bn: nn.BatchNorm1d, features: torch.Tensor) -> torch.Tensor:
    """BN applied to each of the n features (B, n, D) in turn: separate batch statistics, as separate calls."""
    # One call per feature, not one over (B*n, D): training statistics and running averages stay faithful.
    return torch.stack([bn(features[:, i]) for i in range(features.shape[1])], dim=1)
