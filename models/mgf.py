"""MGF's shared residual cross-attention block (docs/method.md §2): a global token attends to its group, then to all tokens.

MGF reads only the block's first output position (the local-global feature). Cross-attention and the MLP act
on each position alone, so only the first position is carried past self-attention: the result is the method's
x[:, 0], at a fraction of the cost. With a handful of queries, the key and value projections are folded into
the queries instead of being applied to every one of the N memory tokens (N x D x D work per sample).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from clip.transformer import quickgelu_mlp


class FoldedAttention(nn.Module):
    """Multi-head attention for few queries over many keys; nn.MultiheadAttention's parameter names and maths."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(
        self, query: torch.Tensor, memory: torch.Tensor, key_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """query (B, T, D) attends to memory (B, N, D); key_padding_mask (B, N) is True for keys to ignore."""
        batch, length, width = query.shape
        heads = self.num_heads
        head_dim = width // heads
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, _, b_v = self.in_proj_bias.chunk(3)
        q = F.linear(query, w_q, b_q).view(batch, length, heads, head_dim) / math.sqrt(head_dim)
        # q_h . (W_k,h m + b_k,h) = (W_k,h^T q_h) . m + a constant over keys, which the softmax cancels.
        q_folded = torch.einsum("bthe,hed->bhtd", q, w_k.view(heads, head_dim, width)).reshape(batch, -1, width)
        scores = torch.bmm(q_folded, memory.transpose(1, 2))  # (B, heads * T, N): one product per sample
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask.unsqueeze(1), float("-inf"))
        # sum_n a_n (W_v,h m_n + b_v,h) = W_v,h (sum_n a_n m_n) + b_v,h, as the weights a_n sum to 1.
        weights = scores.softmax(dim=-1, dtype=torch.float32).to(memory.dtype)  # softmax in fp32 under AMP
        context = torch.bmm(weights, memory).view(batch, heads, length, width)
        values = torch.einsum("bhtd,hed->bthe", context, w_v.view(heads, head_dim, width)) + b_v.view(heads, -1)
        return self.out_proj(values.reshape(batch, length, width))


class ResidualCrossAttentionBlock(nn.Module):
    """Pre-LN block: x += SelfAttn(LN0(x)); x += CrossAttn(LN1(x), memory); x += MLP(LN2(x)); output x[:, 0]."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_0 = nn.LayerNorm(width)
        self.self_attn = FoldedAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.cross_attn = FoldedAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = quickgelu_mlp(width)

    def forward(
        self, x: torch.Tensor, memory: torch.Tensor, key_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """First-position output of the block for x (B, T, D) -> (B, D), or for G groups (B, G, T, D) -> (B, G, D).

        memory (B, N, D) are the keys/values (not layer-normed); all G groups of a sample attend to it together.
        """
        grouped = x if x.dim() == 4 else x.unsqueeze(1)
        batch, groups, length, width = grouped.shape
        h = self.ln_0(grouped).reshape(batch * groups, length, width)
        first = grouped[:, :, 0] + self.self_attn(h[:, :1], h).view(batch, groups, width)
        first = first + self.cross_attn(self.ln_1(first), memory, key_padding_mask)
        first = first + self.mlp(self.ln_2(first))
        return first if x.dim() == 4 else first.squeeze(1)


def mgf_heads(width: int) -> int:
    """docs/method.md §2: one attention head per 64 channels (at least one, for tiny test models)."""
    return max(1, width // 64)


def local_global_features(
    block: ResidualCrossAttentionBlock,
    global_token: torch.Tensor,
    groups: tuple[torch.Tensor, ...],
    tokens: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """docs/method.md §2 MGF: block([global ; group], all tokens)[:, 0] for each group, stacked to (B, n_groups, D)."""
    queries = torch.stack([torch.cat([global_token.unsqueeze(1), group], dim=1) for group in groups], dim=1)
    return block(queries, tokens, key_padding_mask)
