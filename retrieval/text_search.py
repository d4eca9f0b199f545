r"""Sentences -> ranked images of a search index: the index's model encodes the text, ranking.top_k ranks.

The query side is test.py's: `model.tokenize` (over-long text is truncated with a warning), `encode_texts`,
the concatenated retrieval feature in fp32 (or the same from an exported ONNX folder in onnxruntime:
retrieval/search_model.py); the gallery side is the index's stored fp16 features. The results
are written as `search.py query` shows them: a table, JSON lines, or PNG pages. Opening the index verifies it
(retrieval/index.py read_index: its manifest's fields and its features' SHA256). A file name that is not UTF-8
is shown in the table with its odd bytes as \xNN and written in JSON with Python's surrogateescape code points
as \udcNN escapes (json.loads, then os.fsencode, gives its bytes back).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from evaluation.visualize import ranking_page
from retrieval.image_folder import json_text, shown_name
from retrieval.index import SearchIndex, SearchIndexError, read_index, same_model
from retrieval.ranking import top_k
from retrieval.search_model import SearchModel, load_search_model, model_identity


@dataclass(frozen=True)
class Hit:
    """One ranked image: rank from 1, cosine score, path relative to the index's image folder."""

    rank: int
    score: float
    path: str


class TextSearch:
    """A loaded index and the model that built it; `search` ranks every indexed image for each sentence."""

    def __init__(self, index: SearchIndex, model: SearchModel, device: torch.device, cpu_threads: int | None = 1):
        self.index, self.model, self.device, self.cpu_threads = index, model, device, cpu_threads
        # On a GPU the fp16 gallery is copied once (2 bytes per value); on the CPU it stays memory-mapped.
        self.gallery = torch.from_numpy(index.features).to(device) if device.type != "cpu" else index.features

    @torch.no_grad()
    def search(self, captions: list[str], k: int, batch_size: int = 128, warn_truncated: bool = True) -> list[list[Hit]]:
        """Top-k images per caption, best first (ties: lower index first, as test.py's metrics), batch by batch;
        over-long captions are truncated, with a warning unless warn_truncated is False."""
        if not self.index.images:
            raise SearchIndexError(f"{self.index.location} holds no images: run `search.py index` on a folder "
                                   "with readable images")
        results = []
        for start in range(0, len(captions), batch_size):
            queries = self.model.encode_captions(captions[start:start + batch_size], warn_truncated).to(self.device)
            best = top_k(queries, self.gallery, k, cpu_threads=self.cpu_threads)
            results += [[Hit(rank + 1, score, self.index.images[i].path) for rank, (score, i) in enumerate(zip(s, rows))]
                        for s, rows in zip(best.scores.tolist(), best.indices.tolist())]
        return results


def load_text_search(location: str | os.PathLike, device: torch.device,
                     checkpoint: str | os.PathLike | None = None, cpu_threads: int | None = 1) -> TextSearch:
    """Read an index and load the model it records (or `checkpoint`: the same checkpoint's bytes, or an exported ONNX
    folder of it, or the checkpoint an exported folder came from)."""
    index = read_index(location)
    path = Path(checkpoint or index.checkpoint["path"])
    recorded = index.checkpoint["sha256"]
    if not path.exists():
        raise SearchIndexError(f"{location} was built with the checkpoint {path}, which no longer exists; pass its "
                               "new location with --checkpoint, or rebuild the index with another checkpoint")
    identity = model_identity(path)
    if not same_model(index.checkpoint, identity):
        raise SearchIndexError(f"{path} is not the checkpoint {location} was built with, nor an export of it (its SHA256 "
                               f"differs from the recorded {recorded[:12]}...): its text features would not match the "
                               "stored image features. Pass the original file with --checkpoint, or rebuild the index")
    return TextSearch(index, load_search_model(path, device, identity=identity), device, cpu_threads)


def hits_json(sentence: str, hits: list[Hit], image_root: Path) -> str:
    """One JSON line: the sentence and its ranked images (rank, score, relative path, file)."""
    return json_text({"query": sentence, "results": [
        {"rank": h.rank, "score": h.score, "path": h.path, "file": str(image_root / h.path)} for h in hits]})


def hits_table(sentence: str, hits: list[Hit], image_root: Path, total: int) -> str:
    """A sentence's ranked images as a table (rank, score, path), headed by what was searched."""
    return shown_name("\n".join([f"{sentence!r}: top {len(hits)} of {total} images in {image_root}", f"{'rank':>6s} "
                                 f"{'score':>7s}  image", *(f"{h.rank:6d} {h.score:7.4f}  {h.path}" for h in hits)]))


def page_paths(page: str | os.PathLike, count: int) -> list[Path]:
    """OUT.png for one sentence; OUT.png, OUT-2.png, ... for several."""
    out = Path(page)
    return [out] + [out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}") for i in range(2, count + 1)]


def write_pages(page: str | os.PathLike, sentences: list[str], results: list[list[Hit]], image_root: Path,
                total: int) -> list[Path]:
    """One PNG per sentence (page_paths): the sentence and its ranked images with rank and score; returns the paths."""
    paths = page_paths(page, len(results))
    for sentence, hits, out in zip(sentences, results, paths):
        ranking_page(sentence, [str(image_root / h.path) for h in hits], None, out,
                     title=shown_name(f"top {len(hits)} of {total} images in {image_root}"),
                     labels=[f"{h.rank}: {h.score:.3f}" for h in hits])
    return paths
