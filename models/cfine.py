"""CFine: CLIP image and text encoders plus the CFine head (spec §1-5), and the retrieval feature (spec §7)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clip.model import CLIP

from .config import CFineConfig
from .head import CFineHead, CFineOutput
from .tokenization import caption_tokenizer, clip_token_count, warn_if_truncated


def retrieval_features(features: torch.Tensor, mode: str = "concat") -> torch.Tensor:
    """Spec §7: L2-normalised [global, lg1, lg2] concatenation (B, 3D), or the global feature alone (B, D)."""
    if mode == "concat":
        return F.normalize(features.flatten(1), dim=-1)
    if mode == "global":
        return F.normalize(features[:, 0], dim=-1)
    raise ValueError(f"retrieval feature mode {mode!r} is unknown; use 'concat' (the paper's) or 'global'")


class CFine(nn.Module):
    """CLIP encoders + MGF + BN at inference; CFR, FCD and the weighted losses in training."""

    def __init__(self, config: CFineConfig):
        super().__init__()
        self.config = config
        self.clip = CLIP(config.clip)
        self.clip.logit_scale.requires_grad_(False)  # CLIP's contrastive temperature is not used by CFine
        self.head = CFineHead(config)

    def tokenize(self, captions: list[str], warn_truncated: bool = False) -> torch.Tensor:
        """Token ids for this model's text encoder, (N, L) long; over-long captions are truncated (warned if asked)."""
        if warn_truncated:
            warn_if_truncated(captions, [clip_token_count(c) for c in captions], self.config.clip.text.context_length)
        return caption_tokenizer("clip")(captions)

    def load_clip_weights(self, source: nn.Module | dict[str, torch.Tensor]) -> None:
        """Copy pretrained CLIP weights (a CLIP module or its state dict) into the encoders, strictly."""
        state = source.state_dict() if isinstance(source, nn.Module) else source
        try:
            self.clip.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise RuntimeError(
                f"pretrained CLIP weights do not fit this CFine's clip config ({self.config.clip}); build the model "
                f"with the CLIPConfig that clip.load returned for these weights.\n{error}"
            ) from error

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, pids: torch.Tensor | None = None) -> CFineOutput:
        """Features (B, 3, D) per modality; in training mode with pids also the total loss and its parts."""
        image = self.clip.encode_image_tokens(images)
        text = self.clip.encode_text_tokens(tokens)
        return self.head(image, text, pids)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Gallery side of spec §7: [BN(global), BN(lg1), BN(lg2)] image features, (B, 3, D)."""
        return self.head.image_features(self.clip.encode_image_tokens(images))

    def encode_texts(self, tokens: torch.Tensor) -> torch.Tensor:
        """Query side of spec §7: [BN(EOT), BN(lg1), BN(lg2)] text features, (B, 3, D)."""
        return self.head.text_features(self.clip.encode_text_tokens(tokens))
