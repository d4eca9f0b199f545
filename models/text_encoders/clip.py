"""CLIP's own text tower as CFine's text encoder (the project's default): BPE ids (77), tokens projected into the
joint space, D = clip.embed_dim. Its weights are CFine's `clip.*` beside `clip.visual.*`, read with the image
tower's from the --clip weights."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from clip.model import CLIP, CLIPConfig, TokenFeatures
from clip.tokenizer import CONTEXT_LENGTH, default_tokenizer
from models.selection import text_candidates

from .base import TextEncoder

if TYPE_CHECKING:
    from models.config import CFineConfig


class ClipCaptionTokenizer:
    """CLIP BPE ids (N, 77): SOT, BPE, EOT, zero padding; an over-long caption is cut with EOT kept last."""

    max_length = CONTEXT_LENGTH
    raw_captions = False  # data.sh's cleaned captions, as before (CLIP's tokenizer cleans them again anyway)

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        return default_tokenizer().tokenize(list(captions), context_length=CONTEXT_LENGTH, truncate=True)

    def token_counts(self, captions: Sequence[str]) -> list[int]:
        """How many CLIP ids each caption needs, SOT and EOT included (over 77: it is truncated)."""
        return [len(default_tokenizer().encode(caption)) + 2 for caption in captions]


clip_token_ids = ClipCaptionTokenizer()


class ClipTextEncoder(TextEncoder):
    """CLIP's text tower inside CFine's CLIP module: EOT is the global token, the positions after it are padding."""

    name = "clip"
    attribute = "clip"

    @classmethod
    def image_tower(cls, clip: CLIPConfig) -> CLIPConfig:
        """The whole CLIP: its text tower is this encoder, its projection gives both towers' tokens the width D."""
        return clip

    @classmethod
    def check_config(cls, config: CFineConfig) -> None:
        """A CLIP with its text tower and joint projection."""
        if config.clip.text is None or config.clip.embed_dim is None:
            raise ValueError("text_encoder 'clip' needs a CLIP with its text tower and joint projection: CLIP's text "
                             "tokens are text.width wide before projection and the image tokens vision.width, so the "
                             "unprojected (768-d) image tokens have no text partner without a new layer")

    @classmethod
    def clip_weights(cls, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every weight of the CLIP file: both towers."""
        return dict(state)

    @classmethod
    def tokenizer(cls, options: Mapping[str, Any], vocab: str | None) -> ClipCaptionTokenizer:
        """CLIP's BPE (its vocabulary ships with clip/)."""
        return clip_token_ids

    @classmethod
    def build(cls, config: CFineConfig, clip: CLIP, vocab: str | None) -> None:
        """Nothing to add: the tower is `clip`'s; CLIP's contrastive temperature is frozen, CFine does not use it."""
        clip.logit_scale.requires_grad_(False)
        return None

    @classmethod
    def encode(cls, module: CLIP, ids: torch.Tensor) -> TokenFeatures:
        """CLIP's text tokens in the joint space, the EOT token's attention row, EOT's index, the positions after it."""
        return module.encode_text_tokens(ids)

    @classmethod
    def candidates(cls, text: TokenFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        """docs/method.md §2 CLIP-text candidates: every position but SOT (an attention sink) and the EOT global token."""
        return text_candidates(text.global_index, text.tokens.shape[1]), text.global_attention

    @classmethod
    def parameters(cls, module: CLIP) -> Iterator[nn.Parameter]:
        """The CLIP module's parameters outside the image tower, the temperature left out."""
        return (p for name, p in module.named_parameters() if not name.startswith("visual.") and name != "logit_scale")
