"""The CMPC identity classifier W (docs/method.md §5): D x num_classes, Xavier-uniform, column-normalised when used."""
from __future__ import annotations

import torch
from torch import nn


class CMPCClassifier(nn.Module):
    """Holds W (D, num_classes) for cmpc_loss; trained at the head's learning rate."""

    def __init__(self, width: int, num_classes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(width, num_classes))
        nn.init.xavier_uniform_(self.weight)

