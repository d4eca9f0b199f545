"""A tiny random BERT in Hugging Face layout (config.json, vocab.txt, weights), written by the tests themselves.

The public bert-base-uncased files cannot be downloaded here, so the tests make folders of exactly that
layout with transformers' own writer (`save_pretrained`), at a width that pairs with the tiny CLIP (64).
"""
from __future__ import annotations

import string
from pathlib import Path

import torch

SPECIALS = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["a", "an", "the", "man", "woman", "girl", "boy", "person", "wearing", "wears", "with", "in", "and", "of",
         "red", "blue", "black", "white", "green", "coat", "shirt", "pants", "shoes", "bag", "backpack", "hair",
         "long", "short", "dark", "light", "jacket", "carrying", "holding", "walking", "young", "old", "cafe",
         "jeans", "t", "-", "his", "her", "is", "has", "on", "at", "to", "sleeve", "##s", "##ed", "##ing", "##er",
         "##ly", "un", "##able"]


def tiny_vocab() -> list[str]:
    """Specials, some words, every printable ASCII character alone and as a '##' continuation, a few non-ASCII."""
    chars = [c for c in string.printable if not c.isspace()]
    extra = ["é", "ü", "ß", "中", "文", "—", "’", "…", "😀"]
    pieces = [c.lower() for c in chars] + extra
    vocab = SPECIALS + WORDS
    for piece in pieces + ["##" + p for p in pieces]:
        if piece not in vocab:
            vocab.append(piece)
    return vocab


def write_vocab(path: Path) -> Path:
    """vocab.txt, one token per line (id = line number), as in the public release."""
    path.write_text("\n".join(tiny_vocab()) + "\n", encoding="utf-8")
    return path


def tiny_bert_config(hidden: int = 64, layers: int = 2, heads: int = 2):
    """A BertConfig of the requested shape over the tiny vocabulary, 100+ positions, dropout 0.1 as BERT-base."""
    import transformers

    return transformers.BertConfig(vocab_size=len(tiny_vocab()), hidden_size=hidden, num_hidden_layers=layers,
                                   num_attention_heads=heads, intermediate_size=4 * hidden,
                                   max_position_embeddings=128, hidden_dropout_prob=0.1,
                                   attention_probs_dropout_prob=0.1)


def write_bert_folder(folder: Path, hidden: int = 64, layers: int = 2, heads: int = 2, seed: int = 0,
                      safetensors: bool = True) -> Path:
    """A random BERT saved in Hugging Face layout (config.json, vocab.txt, model.safetensors/pytorch_model.bin)."""
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = transformers.BertModel(tiny_bert_config(hidden, layers, heads), add_pooling_layer=False)
    if safetensors:
        model.save_pretrained(folder)
    else:  # transformers 5 writes safetensors only; pytorch_model.bin is a torch.save'd state dict, as in 4.x
        model.config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    write_vocab(folder / "vocab.txt")
    return folder


def copy_bert_folder(source: Path, folder: Path) -> Path:
    """A private copy of a BERT folder, to damage in one way."""
    import shutil

    shutil.copytree(source, folder)
    return folder
