"""Residual attention blocks of CLIP, with OpenAI's parameter names.

All layers run `F.scaled_dot_product_attention`. The last layer can additionally return one row of its
attention matrix (the global token's, averaged over heads), computed from that token's query alone:
a (B, heads, 1, N) product instead of the full N x N map that CFine never uses.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), the activation OpenAI's CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def quickgelu_mlp(width: int) -> nn.Sequential:
    """CLIP's 4x MLP: c_fc, QuickGELU, c_proj (OpenAI's state-dict names)."""
    return nn.Sequential(
        OrderedDict([("c_fc", nn.Linear(width, 4 * width)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(4 * width, width))])
    )


class SelfAttention(nn.Module):
    """Multi-head self-attention storing weights like nn.MultiheadAttention (in_proj_*, out_proj)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool = False, row_index: torch.Tensor | None = None):
        """Attention output (B, N, W), and the head-averaged attention row of token row_index[b] if given."""
        batch, length, width = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, length, width))
        if row_index is None:
            return out, None
        return out, self._attention_row(q, k, causal, row_index)

    @staticmethod
    def _attention_row(q: torch.Tensor, k: torch.Tensor, causal: bool, row_index: torch.Tensor) -> torch.Tensor:
        """softmax(q_g k^T / sqrt(d)) for the one query token g per sample, averaged over heads: (B, N)."""
        batch, heads, length, dim = q.shape
        gather = row_index.view(batch, 1, 1, 1).expand(batch, heads, 1, dim)
        with torch.autocast(q.device.type, enabled=False):  # scores and softmax in fp32 under AMP
            q_row = q.gather(2, gather).float()
            scores = (q_row @ k.float().transpose(-2, -1)).squeeze(2) * dim**-0.5  # (B, heads, N)
        if causal:
            future = torch.arange(length, device=q.device).view(1, 1, length) > row_index.view(batch, 1, 1)
            scores = scores.masked_fill(future, float("-inf"))
        return scores.softmax(dim=-1).mean(dim=1)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: x + attn(ln_1(x)); x + mlp(ln_2(x)) with a 4x QuickGELU MLP."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = quickgelu_mlp(width)

    def forward(self, x: torch.Tensor, causal: bool = False, row_index: torch.Tensor | None = None):
        attended, row = self.attn(self.ln_1(x), causal, row_index)
        x = x + attended
        return x + self.mlp(self.ln_2(x)), row


class Transformer(nn.Module):
    """A stack of residual attention blocks on (B, N, W) tokens."""

    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))

    def forward(self, x: torch.Tensor, causal: bool = False, row_index: torch.Tensor | None = None):
        """Returns the tokens and, if row_index is given, the last layer's attention row of that token."""
        row = None
        last = len(self.resblocks) - 1
        for i, block in enumerate(self.resblocks):
            x, row = block(x, causal, row_index if i == last else None)
        return x, row

    def init_weights(self) -> None:
        """OpenAI's initialisation: std width^-0.5 for attention, depth-scaled for output projections."""
        proj_std = self.width**-0.5 * (2 * self.layers) ** -0.5
        attn_std = self.width**-0.5
        fc_std = (2 * self.width) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.zeros_(block.attn.in_proj_bias)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.out_proj.bias)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.zeros_(block.mlp.c_fc.bias)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
            nn.init.zeros_(block.mlp.c_proj.bias)
