"""Zero-shot CLIP: CLIP's own pooled image and text embeddings ranked with no CFine head, the baseline that CFine's
fine-tuning is measured against (test.py --zero_shot, docs/training.md)."""
from __future__ import annotations

import os

import torch
from torch import nn

import clip
from clip.model import CLIP
from models.tokenization import CaptionTokenizer, clip_token_ids

# The console's name for the one retrieval feature (evaluation/encode.py format_table).
FEATURE_NAME = "CLIP pooled"


class ZeroShotCLIP(nn.Module):
    """CLIP behind encode_split's interface: one feature (B, 1, D) per image and per caption.

    Image: ln_post(class token) @ visual proj; text: ln_final(EOT token) @ text_projection (clip/model.py's
    encode_image and encode_text, OpenAI's pooling). encode_split's retrieval feature (models/cfine.py
    retrieval_features) L2-normalises them, so the ranking is CLIP's cosine similarity.
    """

    def __init__(self, weights: CLIP):
        super().__init__()
        self.clip = weights
        self.config = weights.config

    @property
    def feature_shape(self) -> tuple[int, int]:
        """(n, D) per image and caption: n = 1 (the pooled embedding), D = CLIP's embed_dim."""
        return 1, self.config.embed_dim

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) the weights were built for: the checkpoint's native resolution (clip.load's config)."""
        return tuple(self.config.vision.image_size)

    @property
    def tokenizer(self) -> CaptionTokenizer:
        """CLIP's BPE, context 77 (the tokeniser of CFine's default text encoder)."""
        return clip_token_ids

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP's image embedding, (B, 1, D), not normalised."""
        return self.clip.encode_image(images).unsqueeze(1)

    def encode_texts(self, tokens: torch.Tensor) -> torch.Tensor:
        """CLIP's text embedding, (B, 1, D), not normalised."""
        return self.clip.encode_text(tokens).unsqueeze(1)


def load_zero_shot(name_or_path: str | os.PathLike, device: str | torch.device = "cpu") -> ZeroShotCLIP:
    """ZeroShotCLIP of clip.load's weights (a released name or a file) at their native resolution, in eval mode.

    clip.load's errors (a released name with no local file and no network, a damaged or non-CLIP file) are its
    one-line CheckpointErrors, naming the file.
    """
    weights, _ = clip.load(name_or_path, device=device)
    return ZeroShotCLIP(weights).eval()
