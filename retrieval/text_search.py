"""Sentences -> ranked images of a search index: the index's checkpoint encodes the text, gallery_search ranks.

The query side is test.py's: `model.tokenize` (over-long text is truncated with a warning), `encode_texts`,
the concatenated retrieval feature in fp32; the gallery side is the index's stored fp16 features.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from models.cfine import CFine, retrieval_features
from models.checkpoint import load_model
from retrieval.index import FEATURE, SearchIndex, SearchIndexError, read_index
from retrieval.ranking import top_k
from utils.files import sha256_file


@dataclass(frozen=True)
class Hit:
    """One ranked image: rank from 1, cosine score, path relative to the index's image folder."""

    rank: int
    score: float
    path: str


class TextSearch:
    """A loaded index and the model that built it; `search` ranks every indexed image for each sentence."""

    def __init__(self, index: SearchIndex, model: CFine, device: torch.device, cpu_threads: int | None = 1):
        self.index, self.model, self.device, self.cpu_threads = index, model, device, cpu_threads
        # On a GPU the fp16 gallery is copied once (2 bytes per value); on the CPU it stays memory-mapped.
        self.gallery = torch.from_numpy(index.features).to(device) if device.type != "cpu" else index.features

    @torch.no_grad()
    def search(self, captions: list[str], k: int, batch_size: int = 128) -> list[list[Hit]]:
        """Top-k images per caption, best first (ties: lower index first, as test.py's metrics), batch by batch."""
        if not self.index.images:
            raise SearchIndexError(f"{self.index.location} holds no images: run `search.py index` on a folder "
                                   "with readable images")
        results = []
        for start in range(0, len(captions), batch_size):
            tokens = self.model.tokenize(list(captions[start:start + batch_size]), warn_truncated=True)
            queries = retrieval_features(self.model.encode_texts(tokens.to(self.device)).float(), FEATURE)
            best = top_k(queries, self.gallery, k, cpu_threads=self.cpu_threads)
            results += [[Hit(rank + 1, score, self.index.images[i].path) for rank, (score, i) in enumerate(zip(s, rows))]
                        for s, rows in zip(best.scores.tolist(), best.indices.tolist())]
        return results


def load_text_search(location: str | os.PathLike, device: torch.device,
                     checkpoint: str | os.PathLike | None = None, cpu_threads: int | None = 1) -> TextSearch:
    """Read an index and load the checkpoint it records (or `checkpoint`, which must be the same file's bytes)."""
    index = read_index(location)
    path = Path(checkpoint or index.checkpoint["path"])
    recorded = index.checkpoint["sha256"]
    if not path.is_file():
        raise SearchIndexError(f"{location} was built with the checkpoint {path}, which no longer exists; pass its "
                               "new location with --checkpoint, or rebuild the index with another checkpoint")
    if sha256_file(path) != recorded:
        raise SearchIndexError(f"{path} is not the checkpoint {location} was built with (its SHA256 differs from the "
                               f"recorded {recorded[:12]}...): its text features would not match the stored image "
                               "features. Pass the original file with --checkpoint, or rebuild the index")
    model, _ = load_model(path, device)
    return TextSearch(index, model, device, cpu_threads)
