"""What an export carries of its caption tokeniser: the files (CLIP's BPE merges with their licence, or the
checkpoint's BERT vocab.txt) and the rules, written out in export.json for code outside this repository.

One entry per text encoder of models/text_encoders/ (a new encoder adds one here). Inside this repository the
exported folder is tokenised by the text encoder's own tokeniser (export/exported.py), so its ids are those of
test.py and search.py by construction; the rules below describe that tokeniser for a reimplementation.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from clip.tokenizer import BPE_PATH, CONTEXT_LENGTH, NUM_MERGES, default_tokenizer
from models.cfine import CFine
from utils.errors import CheckpointError

BPE_FILE = Path(BPE_PATH).name
BPE_LICENSE = Path(BPE_PATH).with_name("BPE_LICENSE.txt")
VOCAB_FILE = "vocab.txt"


def _clip(model: CFine) -> tuple[dict[str, bytes], dict]:
    """CLIP's byte-level BPE (docs/method.md §1): the merges file clip/ ships, context 77."""
    files = {BPE_FILE: Path(BPE_PATH).read_bytes(), BPE_LICENSE.name: BPE_LICENSE.read_bytes()}
    tokenizer = default_tokenizer()
    rules = {
        "kind": "clip-bpe", "file": BPE_FILE, "license": BPE_LICENSE.name, "context_length": CONTEXT_LENGTH,
        "sot_id": tokenizer.sot_token, "eot_id": tokenizer.eot_token, "pad_id": 0,
        "rule": "OpenAI CLIP's tokenizer: ftfy.fix_text, HTML unescape (twice), whitespace runs to one space, strip, "
                f"lower case; CLIP's pre-tokenising regex; byte-level BPE with the first {NUM_MERGES} merges after the "
                "file's header line; "
                "ids = [SOT] + BPE ids + [EOT], an over-long caption cut to 76 ids then [EOT] (EOT kept last), "
                "zero padded to 77. The literal strings <|startoftext|> and <|endoftext|> in a caption are "
                "ordinary text (never the special ids): the encoder reads its global token at the argmax id, EOT.",
    }
    return files, rules


def _bert(model: CFine) -> tuple[dict[str, bytes], dict]:
    """The authors' WordPiece rule (docs/method.md §9), from the vocab.txt the checkpoint carries."""
    if model.text_vocab is None:
        raise CheckpointError("this bert-mode checkpoint carries no text_vocab (BERT's vocab.txt): it was not written "
                              "by train.py; export needs the vocabulary the model was trained with")
    config = model.config
    rules = {
        "kind": "bert-wordpiece", "file": VOCAB_FILE, "lower_case": config.bert_lower_case,
        "max_length": config.bert_max_length, "pad_id": 0,
        "rule": "BERT's basic + WordPiece tokenizer (transformers' BertTokenizerFast, do_lower_case as lower_case, "
                "accents stripped with it) on the string '[CLS] ' + caption + ' [SEP]' (the special tokens stay "
                "whole), no further special tokens; the first max_length ids kept (a long caption loses its [SEP]), "
                "zero padded; the caption as typed (no other cleaning).",
    }
    return {VOCAB_FILE: model.text_vocab.encode("utf-8")}, rules


TOKENIZER_FILES: dict[str, Callable[[CFine], tuple[dict[str, bytes], dict]]] = {"clip": _clip, "bert": _bert}


def tokenizer_files(model: CFine) -> tuple[dict[str, bytes], dict]:
    """(file name -> bytes, the rules for export.json) of the model's caption tokeniser."""
    name = model.config.text_encoder
    if name not in TOKENIZER_FILES:
        raise CheckpointError(f"export does not know the tokeniser files of text encoder {name!r}; add it to "
                              f"export/tokenizer_files.py (known: {', '.join(TOKENIZER_FILES)})")
    return TOKENIZER_FILES[name](model)
