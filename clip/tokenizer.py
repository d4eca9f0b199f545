"""OpenAI CLIP's byte-level BPE tokenizer: captions -> the (N, 77) id rows the CLIP text encoder reads.

Behaviour matches OpenAI CLIP / open_clip id for id (tests/test_clip_tokenizer.py checks parity), with one
deliberate difference: the literal strings "<|startoftext|>" / "<|endoftext|>" inside a caption are
tokenised as ordinary text, so a caption can never inject an EOT id (the text encoder pools at the
EOT position, found as the argmax of the ids).
The merge list bpe_simple_vocab_16e6.txt.gz is OpenAI's MIT-licensed data (see BPE_LICENSE.txt).
"""
import functools
import gzip
import html
import os
from typing import Iterable, Sequence, Union

import ftfy
import regex
import torch

BPE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpe_simple_vocab_16e6.txt.gz")
CONTEXT_LENGTH = 77
# CLIP keeps the first 49152 - 256 - 2 merges so that bytes + merges + 2 specials fill 49408 ids.
NUM_MERGES = 49152 - 256 - 2
SOT_TEXT, EOT_TEXT = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
_NO_MERGE = float("inf")
# Bounds memory on unbounded vocabularies; real caption corpora have far fewer distinct words.
_CACHE_LIMIT = 500_000

# CLIP's pre-tokenisation: common English contractions, letter runs, single digits, punctuation runs.
_PIECE_PATTERN = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE
)


def byte_alphabet() -> list[tuple[int, str]]:
    """CLIP's reversible byte -> printable character map, as (byte, char) pairs in vocabulary order."""
    # Printable Latin-1 bytes stand for themselves; the other 68 bytes are shifted past U+00FF so
    # that no BPE symbol is whitespace or a control character.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    kept = set(printable)
    shifted = [b for b in range(256) if b not in kept]
    return [(b, chr(b)) for b in printable] + [(b, chr(256 + k)) for k, b in enumerate(shifted)]


def clean_caption(text: str) -> str:
    """CLIP text normalisation: ftfy.fix_text, html.unescape twice, whitespace collapse + strip, lower case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


def _load_merges(path: str) -> list[tuple[str, str]]:
    """Read the first NUM_MERGES merge pairs of a CLIP merges file (first line is a version header)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"CLIP BPE merges file not found at {path}; restore clip/bpe_simple_vocab_16e6.txt.gz "
            "from the repository (or from the open_clip_torch package)"
        )
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    if len(merges) != NUM_MERGES or any(len(pair) != 2 for pair in merges):
        raise ValueError(f"{path} is not a CLIP merges file: expected {NUM_MERGES} 'a b' lines after the header")
    return merges


class Tokenizer:
    """OpenAI CLIP BPE tokenizer (49408 ids: 256 bytes, 256 end-of-word bytes, 48894 merges, SOT, EOT)."""

    def __init__(self, bpe_path: str = BPE_PATH):
        alphabet = byte_alphabet()
        chars = [char for _, char in alphabet]
        self._char_of_byte = [char for _, char in sorted(alphabet)]
        self._byte_of_char = {char: byte for byte, char in alphabet}
        merges = _load_merges(bpe_path)
        symbols = chars + [c + END_OF_WORD for c in chars] + [a + b for a, b in merges] + [SOT_TEXT, EOT_TEXT]
        self._id_of_symbol = {symbol: i for i, symbol in enumerate(symbols)}
        self._symbol_of_id = symbols
        self._rank_of_pair = {pair: rank for rank, pair in enumerate(merges)}
        self._ids_of_piece: dict[str, tuple[int, ...]] = {}
        self.sot_token = self._id_of_symbol[SOT_TEXT]
        self.eot_token = self._id_of_symbol[EOT_TEXT]
        self.vocab_size = len(symbols)

    def _bpe(self, piece: str) -> tuple[int, ...]:
        """Greedy BPE of one pre-token: repeatedly merge every occurrence of the lowest-rank adjacent pair."""
        word = [*piece[:-1], piece[-1] + END_OF_WORD]
        ranks = self._rank_of_pair
        while len(word) > 1:
            pairs = list(zip(word, word[1:]))
            best = min(pairs, key=lambda pair: ranks.get(pair, _NO_MERGE))
            if best not in ranks:
                break
            first, second = best
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return tuple(self._id_of_symbol[symbol] for symbol in word)

    def encode(self, text: str) -> list[int]:
        """Caption -> BPE ids without SOT/EOT (clean_caption, CLIP pre-tokenisation, byte map, BPE)."""
        ids: list[int] = []
        cache = self._ids_of_piece
        for piece in _PIECE_PATTERN.findall(clean_caption(text)):
            piece_ids = cache.get(piece)
            if piece_ids is None:
                piece_ids = self._bpe("".join(self._char_of_byte[b] for b in piece.encode("utf-8")))
                if len(cache) >= _CACHE_LIMIT:
                    cache.clear()
                cache[piece] = piece_ids
            ids.extend(piece_ids)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """BPE ids -> text; each end of word becomes a space (CLIP semantics, so output ends in a space)."""
        text = "".join(self._symbol_of_id[int(i)] for i in ids)
        # Every symbol, the specials' ASCII included, is spelled in byte characters, so this is lossless.
        data = bytes(self._byte_of_char[char] for char in text)
        return data.decode("utf-8", errors="replace").replace(END_OF_WORD, " ")

    def tokenize(
        self, texts: Union[str, Sequence[str]], context_length: int = CONTEXT_LENGTH, truncate: bool = True
    ) -> torch.LongTensor:
        """Captions -> (N, context_length) long ids: SOT, BPE ids, EOT, zero padding (EOT kept last if cut)."""
        if isinstance(texts, str):
            texts = [texts]
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2 (room for SOT and EOT), got {context_length}")
        rows = []
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"caption {index} is a {type(text).__name__}, expected str")
            ids = [self.sot_token, *self.encode(text), self.eot_token]
            if len(ids) > context_length:
                if not truncate:
                    raise ValueError(
                        f"caption {index} has {len(ids)} tokens (SOT and EOT included), more than "
                        f"context_length={context_length}: {text[:60]!r}...; shorten it or pass truncate=True"
                    )
                ids = ids[: context_length - 1] + [self.eot_token]
            rows.append(ids + [0] * (context_length - len(ids)))
        if not rows:
            return torch.zeros(0, context_length, dtype=torch.long)
        return torch.tensor(rows, dtype=torch.long)

    __call__ = tokenize


@functools.lru_cache(maxsize=None)
def default_tokenizer() -> Tokenizer:
    """The process-wide tokenizer on the bundled merges file, loaded on first use (~0.2 s)."""
    return Tokenizer()


def tokenize(
    texts: Union[str, Sequence[str]], context_length: int = CONTEXT_LENGTH, truncate: bool = True
) -> torch.LongTensor:
    """clip.tokenize: captions -> (N, context_length) long ids [SOT, BPE..., EOT, 0...] (OpenAI CLIP)."""
    return default_tokenizer().tokenize(texts, context_length=context_length, truncate=truncate)


def decode(ids: Iterable[int]) -> str:
    """Inverse of encode with the default tokenizer (ids of one caption; end of word -> space)."""
    return default_tokenizer().decode(ids)
