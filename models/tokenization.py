"""Caption -> token ids for the model's text encoder: CLIP's BPE (77) or, in `bert` mode, WordPiece (100).

Captions are tokenised once, when a dataset or a query batch is built; every entry point (train.py, test.py,
search.py) asks `caption_tokenizer` for the function that matches the model it runs, and the model's text encoder
(models/text_encoders/) makes it.
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Protocol, Sequence

import torch

from .text_encoders import text_encoder_class
from .text_encoders.clip import ClipCaptionTokenizer, clip_token_ids

if TYPE_CHECKING:
    from .config import CFineConfig

__all__ = ["CaptionTokenizer", "ClipCaptionTokenizer", "caption_tokenizer", "clip_token_ids", "reads_raw_captions",
           "warn_if_truncated"]


class CaptionTokenizer(Protocol):
    """Captions -> (N, max_length) long ids for one text encoder; token_counts says how many ids each needs.

    raw_captions: whether it reads each caption as the annotation file holds it (bert mode, as the authors did)
    rather than data.sh's cleaned text (datasets/processed.py SplitRecords.caption_texts); False when not set.
    """

    max_length: int
    raw_captions: bool

    def __call__(self, captions: Sequence[str]) -> torch.Tensor: ...

    def token_counts(self, captions: Sequence[str]) -> list[int]: ...


def caption_tokenizer(config: CFineConfig, vocab_text: str | None = None) -> CaptionTokenizer:
    """The tokeniser of config's text encoder; vocab_text: the vocabulary a bert-mode checkpoint carries."""
    return text_encoder_class(config.text_encoder).tokenizer(vars(config), vocab_text)


def reads_raw_captions(tokenizer: CaptionTokenizer) -> bool:
    """Whether tokenizer wants the annotation's caption strings (its `raw_captions`; a tokenizer without one: no)."""
    return bool(getattr(tokenizer, "raw_captions", False))


def warn_if_truncated(captions: Sequence[str], lengths: Sequence[int], limit: int) -> None:
    """One warning naming the captions whose token count exceeds the encoder's limit (they are truncated)."""
    long = [(i, n) for i, n in enumerate(lengths) if n > limit]
    if long:
        shown = "; ".join(f"#{i} ({n} tokens): {captions[i][:50]!r}" for i, n in long[:5])
        more = f" and {len(long) - 5} more" if len(long) > 5 else ""
        warnings.warn(f"{len(long)} caption(s) exceed the text encoder's {limit} tokens and were truncated: "
                      f"{shown}{more}", stacklevel=3)
