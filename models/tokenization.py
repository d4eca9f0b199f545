"""Caption -> token ids for the model's text encoder: CLIP's BPE (77) or, in `bert` mode, WordPiece (100).

Captions are tokenised once, when a dataset or a query batch is built; every entry point (train.py, test.py,
search.py) asks `caption_tokenizer` for the function that matches the model it runs.
"""
from __future__ import annotations

import warnings
from typing import Protocol, Sequence

import torch

from clip.tokenizer import CONTEXT_LENGTH, default_tokenizer


class CaptionTokenizer(Protocol):
    """Captions -> (N, max_length) long ids for one text encoder; token_counts says how many ids each needs."""

    max_length: int

    def __call__(self, captions: Sequence[str]) -> torch.Tensor: ...

    def token_counts(self, captions: Sequence[str]) -> list[int]: ...


class ClipCaptionTokenizer:
    """CLIP BPE ids (N, 77): SOT, BPE, EOT, zero padding; an over-long caption is cut with EOT kept last."""

    max_length = CONTEXT_LENGTH

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        return default_tokenizer().tokenize(list(captions), context_length=CONTEXT_LENGTH, truncate=True)

    def token_counts(self, captions: Sequence[str]) -> list[int]:
        """How many CLIP ids each caption needs, SOT and EOT included (over 77: it is truncated)."""
        return [len(default_tokenizer().encode(caption)) + 2 for caption in captions]


clip_token_ids = ClipCaptionTokenizer()


def caption_tokenizer(text_encoder: str = "clip", vocab_text: str | None = None, lower_case: bool = True,
                      max_length: int = 100) -> CaptionTokenizer:
    """The tokeniser matching a text encoder: 'clip' (BPE, 77 ids) or 'bert' (WordPiece from vocab_text, 100 ids)."""
    if text_encoder == "clip":
        return clip_token_ids
    if text_encoder == "bert":
        from .text_encoders.bert_tokenizer import BertCaptionTokenizer  # only bert mode needs `transformers`

        if vocab_text is None:
            raise ValueError("bert mode needs the vocabulary (vocab.txt's text) to tokenise captions")
        return BertCaptionTokenizer(vocab_text, lower_case, max_length)
    raise ValueError(f"text encoder {text_encoder!r} is unknown; use 'clip' or 'bert'")


def warn_if_truncated(captions: Sequence[str], lengths: Sequence[int], limit: int) -> None:
    """One warning naming the captions whose token count exceeds the encoder's limit (they are truncated)."""
    long = [(i, n) for i, n in enumerate(lengths) if n > limit]
    if long:
        shown = "; ".join(f"#{i} ({n} tokens): {captions[i][:50]!r}" for i, n in long[:5])
        more = f" and {len(long) - 5} more" if len(long) > 5 else ""
        warnings.warn(f"{len(long)} caption(s) exceed the text encoder's {limit} tokens and were truncated: "
                      f"{shown}{more}", stacklevel=3)
