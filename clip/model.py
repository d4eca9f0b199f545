"""CLIP ViT image and text towers with OpenAI's state-dict names, plus the token-level outputs CFine needs."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .config import CLIPConfig, TextConfig, VisionConfig
from .transformer import Transformer

__all__ = ["CLIP", "CLIPConfig", "TextConfig", "TokenFeatures", "VisionConfig", "VisionTransformer"]


class TokenFeatures(NamedTuple):
    """Per-token output of one tower (CLIP's, or BERT's in CFine's `bert` mode)."""

    tokens: torch.Tensor  # (B, N, D): ln_post/ln_final then the projection (if any), for every token
    global_attention: torch.Tensor  # (B, N): last layer's attention row of the global token, head-averaged
    global_index: torch.Tensor  # (B,): position of the global token (0 = class token or [CLS]; EOT for CLIP text)
    padding_mask: torch.Tensor | None = None  # (B, N) bool, True at text padding (keys cross-attention ignores)


class VisionTransformer(nn.Module):
    """Patch embedding, class token, positional embedding, ln_pre, transformer, ln_post, proj."""

    def __init__(self, config: VisionConfig, embed_dim: int | None):
        super().__init__()
        width = config.width
        self.config = config
        self.conv1 = nn.Conv2d(3, width, kernel_size=config.patch_size, stride=config.patch_size, bias=False)
        scale = width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(config.num_tokens, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, config.layers, config.heads)
        self.ln_post = nn.LayerNorm(width)
        # embed_dim None: no projection at all (CFine's bert mode uses the 768-d ln_post tokens, docs/method.md §9).
        self.proj = None if embed_dim is None else nn.Parameter(scale * torch.randn(width, embed_dim))
        self.transformer.init_weights()

    def _encode(self, images: torch.Tensor, with_attention: bool):
        x = self.conv1(images).flatten(2).transpose(1, 2)  # (B, patches, W)
        if x.shape[1] + 1 != self.positional_embedding.shape[0]:
            raise ValueError(
                f"images of size {tuple(images.shape[-2:])} give {x.shape[1]} patches but the model was built for "
                f"{tuple(self.config.image_size)}; build or load the model with image_size={tuple(images.shape[-2:])}"
            )
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        row_index = torch.zeros(x.shape[0], dtype=torch.long, device=x.device) if with_attention else None
        x, row = self.transformer(self.ln_pre(x), causal=False, row_index=row_index)
        return x, row, row_index

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.proj is None else x @ self.proj

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP's image embedding: ln_post(class token) @ proj, (B, D)."""
        x, _, _ = self._encode(images, with_attention=False)
        return self._project(self.ln_post(x[:, 0]))

    def forward_tokens(self, images: torch.Tensor) -> TokenFeatures:
        """Every token through ln_post and proj (if any), (B, N, D), and the class token's last-layer attention row."""
        x, row, index = self._encode(images, with_attention=True)
        return TokenFeatures(self._project(self.ln_post(x)), row, index)


class CLIP(nn.Module):
    """OpenAI CLIP (ViT image tower + causal text tower); strict-loads OpenAI's released state dicts.

    With config.text None it is the image tower alone (`visual.*` keys only).
    """

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        text = config.text
        self.visual = VisionTransformer(config.vision, config.embed_dim)
        if text is None:
            if config.embed_dim is not None:
                raise ValueError("an image-only CLIP has no joint space: build it with embed_dim=None (vision_only())")
            return
        if config.embed_dim is None:
            raise ValueError("a CLIP with a text tower needs embed_dim, the width of the joint space")
        self.token_embedding = nn.Embedding(text.vocab_size, text.width)
        self.positional_embedding = nn.Parameter(torch.empty(text.context_length, text.width))
        self.transformer = Transformer(text.width, text.layers, text.heads)
        self.ln_final = nn.LayerNorm(text.width)
        self.text_projection = nn.Parameter(torch.empty(text.width, config.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(float(torch.log(torch.tensor(1 / 0.07)))))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=text.width**-0.5)
        self.transformer.init_weights()

    def _encode_text(self, ids: torch.Tensor, with_attention: bool):
        if ids.shape[1] != self.positional_embedding.shape[0]:
            raise ValueError(f"token ids have length {ids.shape[1]}, the model expects {self.positional_embedding.shape[0]}")
        eot = ids.argmax(dim=-1)  # EOT has the largest id in CLIP's vocabulary
        x = self.token_embedding(ids) + self.positional_embedding
        x, row = self.transformer(x, causal=True, row_index=eot if with_attention else None)
        return self.ln_final(x), row, eot

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP's pooled, projected image feature (B, D)."""
        return self.visual(images)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """CLIP's pooled, projected text feature (B, D): the EOT token through ln_final and text_projection."""
        x, _, eot = self._encode_text(ids, with_attention=False)
        return x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection

    def encode_image_tokens(self, images: torch.Tensor) -> TokenFeatures:
        """All image tokens in the joint space (B, 1 + patches, D) and the class token's attention row."""
        return self.visual.forward_tokens(images)

    def encode_text_tokens(self, ids: torch.Tensor) -> TokenFeatures:
        """All text tokens in the joint space (B, L, D), the EOT token's attention row (0 after EOT) and, as the
        padding mask, the positions after EOT."""
        x, row, eot = self._encode_text(ids, with_attention=True)
        padding = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0) > eot.unsqueeze(1)
        return TokenFeatures(x @ self.text_projection, row, eot, padding)

    def forward(self, images: torch.Tensor, ids: torch.Tensor):
        """Pooled image and text features, as the reference CLIP's encode_image / encode_text."""
        return self.encode_image(images), self.encode_text(ids)
