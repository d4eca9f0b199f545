"""The authors' caption tokenisation for BERT (docs/method.md §9), on `transformers`' WordPiece tokenizer.

Rule: the string "[CLS] " + caption + " [SEP]" is tokenised (the special tokens stay whole), converted to ids,
cut to the first `max_length` ids after [SEP] was added (so a long caption loses its [SEP], a faithful
quirk), and padded with id 0. The fast (Rust) tokenizer does the work in one batched call; the tests check
it against the slow Python BertTokenizer used the authors' way, caption by caption.
"""
from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path
from typing import Sequence

import torch

from models.text_encoders.bert import BertFolderError, import_transformers, vocabulary_problem


def authors_string(caption: str) -> str:
    """docs/method.md §9: the caption with its special tokens written out, as the authors tokenised it."""
    return "[CLS] " + caption + " [SEP]"


def pad_ids(rows: Sequence[Sequence[int]], max_length: int) -> torch.Tensor:
    """First max_length ids of every row, zero-padded: (N, max_length) long."""
    out = torch.zeros(len(rows), max_length, dtype=torch.long)
    for n, ids in enumerate(rows):
        ids = list(ids)[:max_length]
        out[n, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


class BertCaptionTokenizer:
    """Captions -> (N, max_length) ids by the authors' rule, from a vocab.txt's text (so it travels in checkpoints).

    It reads each caption as the annotation file holds it (raw_captions): the authors gave BERT the strings of
    reid_raw.json, HTML entities and odd whitespace included, not data.sh's cleaned text (docs/faithfulness.md).
    """

    raw_captions = True

    def __init__(self, vocab_text: str, lower_case: bool = True, max_length: int = 100):
        problem = vocabulary_problem(vocab_text)  # a --bert folder's is checked on reading; this guards the rest
        if problem:
            raise BertFolderError(f"the BERT vocabulary (vocab.txt's text) {problem}, so it is not BERT's vocab.txt: "
                                  "use the one of a BERT release (bert-base-uncased: "
                                  "https://huggingface.co/google-bert/bert-base-uncased)")
        transformers = import_transformers()
        self.max_length = max_length
        # from_pretrained on a folder holding vocab.txt builds the fast tokenizer the same way in transformers
        # 4.x (BertTokenizerFast) and 5.x (where BertTokenizer is the fast one): a private temporary folder.
        with tempfile.TemporaryDirectory(prefix="cfine-vocab-") as folder:
            (Path(folder) / "vocab.txt").write_text(vocab_text, encoding="utf-8")
            self.tokenizer = transformers.BertTokenizerFast.from_pretrained(
                folder, do_lower_case=lower_case, local_files_only=True)

    def token_lists(self, captions: Sequence[str]) -> list[list[int]]:
        """Untruncated ids of every caption by the authors' rule ([CLS] ... [SEP])."""
        if not captions:
            return []
        encoded = self.tokenizer([authors_string(c) for c in captions], add_special_tokens=False,
                                 return_attention_mask=False, return_token_type_ids=False)
        return encoded["input_ids"]

    def token_counts(self, captions: Sequence[str]) -> list[int]:
        """How many ids each caption needs; above max_length it is truncated (and loses its [SEP])."""
        return [len(ids) for ids in self.token_lists(captions)]

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        return pad_ids(self.token_lists(list(captions)), self.max_length)


@functools.lru_cache(maxsize=4)
def _tokenizer_for(vocab_file: str, lower_case: bool, max_length: int) -> BertCaptionTokenizer:
    return BertCaptionTokenizer(Path(vocab_file).read_text(encoding="utf-8"), lower_case, max_length)


def bert_tokenize(captions: Sequence[str], vocab_file: str | os.PathLike, max_length: int = 100,
                  lower_case: bool = True) -> torch.Tensor:
    """docs/method.md §9 tokenisation of captions with a BERT vocab.txt: LongTensor (N, max_length), zero-padded."""
    return _tokenizer_for(str(vocab_file), lower_case, max_length)(captions)
