"""CFine: image and text encoders plus the CFine head (docs/method.md §1-5, §9), and the retrieval feature (docs/method.md §7).

The text encoder is config.text_encoder's (models/text_encoders/): 'clip' (CLIP's own text tower, tokens projected
to D = 512; the project's default) or 'bert' (the authors' release: BERT-base, D = 768, image tokens without
CLIP's visual projection).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clip.model import CLIP, TokenFeatures

from .config import CFineConfig
from .head import CFineHead, CFineOutput
from .text_encoders import text_encoder_class
from .tokenization import CaptionTokenizer, warn_if_truncated


def retrieval_features(features: torch.Tensor, mode: str = "concat") -> torch.Tensor:
    """docs/method.md §7: L2-normalised [global, lg1, lg2] concatenation (B, 3D), or the global feature alone (B, D).

    With mgf off the features are [global] (B, 1, D): both modes give the global feature, D wide.
    """
    if mode == "concat":
        return F.normalize(features.flatten(1), dim=-1)
    if mode == "global":
        return F.normalize(features[:, 0], dim=-1)
    raise ValueError(f"retrieval feature mode {mode!r} is unknown; use 'concat' (the paper's) or 'global'")


class CFine(nn.Module):
    """Encoders + MGF + BN at inference; CFR, FCD and the weighted losses in training.

    `text_vocab` (bert mode): the text of BERT's vocab.txt, which checkpoints carry so that evaluation and
    search tokenise exactly as training did without the BERT folder.
    """

    def __init__(self, config: CFineConfig, text_vocab: str | None = None):
        super().__init__()
        self.config = config
        self.text_encoder = text_encoder_class(config.text_encoder)  # a class: its weights are a module of CFine's
        self.clip = CLIP(config.clip)
        text_module = self.text_encoder.build(config, self.clip, text_vocab)
        if text_module is not None:
            if hasattr(self, self.text_encoder.attribute):
                raise ValueError(f"text encoder {config.text_encoder!r}: attribute {self.text_encoder.attribute!r} is "
                                 "taken in CFine")
            self.add_module(self.text_encoder.attribute, text_module)
        self.text_vocab = text_vocab
        self._tokenizer: CaptionTokenizer | None = None
        self.head = CFineHead(config)

    @property
    def feature_shape(self) -> tuple[int, int]:
        """(n, D) of each image's and caption's BN features: n = 3 ([global, lg1, lg2]), 1 with mgf off ([global])."""
        return self.config.num_features, self.config.width

    @property
    def retrieval_width(self) -> int:
        """Width of the retrieval feature (docs/method.md §7, retrieval_features' concat): n x D of feature_shape."""
        count, width = self.feature_shape
        return count * width

    @property
    def text_module(self) -> nn.Module:
        """The module holding the text encoder's weights (for 'clip', CLIP's own module)."""
        return getattr(self, self.text_encoder.attribute)

    @property
    def tokenizer(self) -> CaptionTokenizer:
        """The caption tokeniser of this model's text encoder (built on first use)."""
        if self._tokenizer is None:
            self._tokenizer = self.text_encoder.tokenizer(vars(self.config), self.text_vocab)
        return self._tokenizer

    def tokenize(self, captions: list[str], warn_truncated: bool = False) -> torch.Tensor:
        """Token ids for this model's text encoder, (N, L) long; over-long captions are truncated (warned if asked)."""
        captions = list(captions)
        if warn_truncated:
            warn_if_truncated(captions, self.tokenizer.token_counts(captions), self.tokenizer.max_length)
        return self.tokenizer(captions)

    def encoder_parameters(self) -> dict[str, list[nn.Parameter]]:
        """docs/method.md §6 encoder groups: image_encoder (clip.visual) and text_encoder (its encoder's choice)."""
        return {"image_encoder": list(self.clip.visual.parameters()),
                "text_encoder": list(self.text_encoder.parameters(self.text_module))}

    def load_clip_weights(self, source: nn.Module | dict[str, torch.Tensor]) -> None:
        """Copy pretrained CLIP weights (a CLIP module or its state dict) into the encoders, strictly.

        Only those the text encoder's CLIP config has: with an image tower alone (bert mode), the `visual.*`
        weights except the projection the authors delete; the text tower's weights in the file are not used.
        """
        state = source.state_dict() if isinstance(source, nn.Module) else source
        state = self.text_encoder.clip_weights(state)
        try:
            self.clip.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise RuntimeError(
                f"pretrained CLIP weights do not fit this CFine's clip config ({self.config.clip}); build the model "
                f"with the CLIPConfig that clip.load returned for these weights.\n{error}"
            ) from error

    def load_text_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy the text encoder's pretrained weights (its load_source's, e.g. --bert's) into its module, strictly."""
        self.text_encoder.load_weights(self.text_module, weights)

    def encode_image_tokens(self, images: torch.Tensor) -> TokenFeatures:
        """Public: image tokens (B, N, D), the class token's last-layer attention row (B, N), global index 0."""
        return self.clip.encode_image_tokens(images)

    def encode_text_tokens(self, ids: torch.Tensor) -> TokenFeatures:
        """Public: text tokens (B, L, D), the global token's last-layer attention row (B, L), its index (EOT for
        CLIP, 0 = [CLS] for BERT) and the padding mask."""
        return self.text_encoder.encode(self.text_module, ids)

    def forward(self, images: torch.Tensor | TokenFeatures, tokens: torch.Tensor | TokenFeatures,
                pids: torch.Tensor | None = None,
                stage: str = "all") -> CFineOutput | tuple[TokenFeatures, TokenFeatures]:
        """Features (B, n, D) per modality (n: feature_shape); in training mode with pids also the total loss and its parts.

        Gradient caching (engine/grad_cache.py) runs the two halves apart, through this same forward so that DDP
        and torch.compile see them: stage 'encoders' returns the (image, text) TokenFeatures of images and token
        ids; stage 'head' takes such a pair in place of images and tokens and returns the CFineOutput.
        """
        if stage == "head":
            return self.head(images, tokens, pids)
        encoded = self.encode_image_tokens(images), self.encode_text_tokens(tokens)
        if stage == "encoders":
            return encoded
        if stage != "all":
            raise ValueError(f"stage {stage!r} is unknown; use 'all', 'encoders' or 'head'")
        return self.head(*encoded, pids)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Gallery side of docs/method.md §7: [BN(global), BN(lg1), BN(lg2)] image features, (B, 3, D) (mgf off: (B, 1, D))."""
        return self.head.image_features(self.encode_image_tokens(images))

    def encode_texts(self, tokens: torch.Tensor) -> torch.Tensor:
        """Query side of docs/method.md §7: [BN(global), BN(lg1), BN(lg2)] text features, (B, 3, D) (mgf off: (B, 1, D))."""
        return self.head.text_features(self.encode_text_tokens(tokens))
