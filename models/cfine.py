"""CFine: image and text encoders plus the CFine head (docs/method.md §1-5, §9), and the retrieval feature (docs/method.md §7).

Two text encoders: 'clip' (CLIP's own text tower, tokens projected to D = 512; the project's default) and
'bert' (the authors' release: BERT-base, D = 768, image tokens without CLIP's visual projection).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clip.model import CLIP, TokenFeatures

from .config import CFineConfig
from .head import CFineHead, CFineOutput
from .tokenization import CaptionTokenizer, caption_tokenizer, warn_if_truncated


def retrieval_features(features: torch.Tensor, mode: str = "concat") -> torch.Tensor:
    """docs/method.md §7: L2-normalised [global, lg1, lg2] concatenation (B, 3D), or the global feature alone (B, D)."""
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
        self.clip = CLIP(config.clip)
        if config.text_encoder == "bert":
            from .text_encoders.bert import build_bert  # only bert mode needs `transformers`

            if text_vocab is None:
                raise ValueError("a bert-mode CFine needs its vocabulary (the text of BERT's vocab.txt)")
            self.bert = build_bert(config.bert)
        else:
            self.clip.logit_scale.requires_grad_(False)  # CLIP's contrastive temperature is not used by CFine
        self.text_vocab = text_vocab
        self._tokenizer: CaptionTokenizer | None = None
        self.head = CFineHead(config)

    @property
    def tokenizer(self) -> CaptionTokenizer:
        """The caption tokeniser of this model's text encoder (built on first use)."""
        if self._tokenizer is None:
            config = self.config
            self._tokenizer = caption_tokenizer(config.text_encoder, self.text_vocab, config.bert_lower_case,
                                                config.bert_max_length)
        return self._tokenizer

    def tokenize(self, captions: list[str], warn_truncated: bool = False) -> torch.Tensor:
        """Token ids for this model's text encoder, (N, L) long; over-long captions are truncated (warned if asked)."""
        captions = list(captions)
        if warn_truncated:
            warn_if_truncated(captions, self.tokenizer.token_counts(captions), self.tokenizer.max_length)
        return self.tokenizer(captions)

    def load_clip_weights(self, source: nn.Module | dict[str, torch.Tensor]) -> None:
        """Copy pretrained CLIP weights (a CLIP module or its state dict) into the encoders, strictly.

        Image-only (bert mode): the `visual.*` weights except the projection the authors delete; the text
        tower's weights in the file are not used.
        """
        state = source.state_dict() if isinstance(source, nn.Module) else source
        if self.config.text_encoder == "bert":
            state = {k: v for k, v in state.items() if k.startswith("visual.") and k != "visual.proj"}
        try:
            self.clip.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise RuntimeError(
                f"pretrained CLIP weights do not fit this CFine's clip config ({self.config.clip}); build the model "
                f"with the CLIPConfig that clip.load returned for these weights.\n{error}"
            ) from error

    def encode_image_tokens(self, images: torch.Tensor) -> TokenFeatures:
        """Public: image tokens (B, N, D), the class token's last-layer attention row (B, N), global index 0."""
        return self.clip.encode_image_tokens(images)

    def encode_text_tokens(self, ids: torch.Tensor) -> TokenFeatures:
        """Public: text tokens (B, L, D), the global token's last-layer attention row (B, L), its index (EOT for
        CLIP, 0 = [CLS] for BERT) and the padding mask."""
        if self.config.text_encoder == "bert":
            from .text_encoders.bert import bert_token_features

            return bert_token_features(self.bert, ids)
        return self.clip.encode_text_tokens(ids)

    def forward(self, images: torch.Tensor | TokenFeatures, tokens: torch.Tensor | TokenFeatures,
                pids: torch.Tensor | None = None,
                stage: str = "all") -> CFineOutput | tuple[TokenFeatures, TokenFeatures]:
        """Features (B, 3, D) per modality; in training mode with pids also the total loss and its parts.

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
        """Gallery side of docs/method.md §7: [BN(global), BN(lg1), BN(lg2)] image features, (B, 3, D)."""
        return self.head.image_features(self.encode_image_tokens(images))

    def encode_texts(self, tokens: torch.Tensor) -> torch.Tensor:
        """Query side of docs/method.md §7: [BN(global), BN(lg1), BN(lg2)] text features, (B, 3, D)."""
        return self.head.text_features(self.encode_text_tokens(tokens))
