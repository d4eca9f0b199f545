"""Exact top-k retrieval over a large gallery: chunked matrix products, memory bounded by the block size.

Every gallery feature is scored (no approximate index). The gallery may be a memory-mapped fp16 array on
disk: it is read one chunk at a time, converted to fp32 in a small reused buffer (sized to stay in the CPU's
cache) and multiplied with the fp32 queries, so the scores are the fp32 dot products test.py computes from
the same stored features. The ranking is evaluation/metrics.py's, with its keys: highest score first, and among
equal scores the lower gallery index first (a stable descending sort gives the same order). torch.topk does not
order ties, so it selects the largest `ranking_keys` (one int64 per score, distinct for every gallery row).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from evaluation.metrics import MAX_KEYED_COLUMNS, decode_ranking_keys, key_scores, ranking_keys

CHUNK_ROWS = 1024  # 1024 x 1536 fp32 = 6 MiB: converted chunk and its product stay in cache
BLOCK_ROWS = 1 << 16  # columns scored before one top-k: Q x 64 Ki x 12 bytes of scores and keys


@dataclass
class TopK:
    """Best k gallery items per query, best first: scores (Q, k) float32 and gallery indices (Q, k) long."""

    scores: Tensor
    indices: Tensor


@contextlib.contextmanager
def _cpu_threads(count: int | None):
    """torch's intra-op thread count set to count (None: unchanged) for the block, then restored."""
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _as_tensor(rows) -> Tensor:
    """A gallery slice as a tensor without copying (NumPy memmaps included)."""
    return torch.from_numpy(rows) if isinstance(rows, np.ndarray) else rows


@torch.no_grad()
def top_k(queries: Tensor, gallery, k: int, chunk_rows: int | None = None, block_rows: int = BLOCK_ROWS,
          cpu_threads: int | None = 1) -> TopK:
    """Exact top-k of s = q . g^T per query row over every gallery row (ties: lower index first).

    queries: (Q, D) float on the device the work runs on; gallery: (N, D) tensor or NumPy array (a writable
    memmap avoids copies), any float dtype, on the CPU or the queries' device. k is clipped to N. Extra
    memory: one (chunk_rows, D) fp32 buffer plus Q x block_rows x 12 bytes, whatever N is; chunk_rows defaults
    to CHUNK_ROWS on the CPU and to block_rows on a GPU (fewer, larger kernels). On the CPU the scan
    runs on cpu_threads intra-op threads (None: torch's setting). One is the robust default: every small
    cache-sized product waits for its slowest thread, so on a busy machine more threads can be far slower
    (benchmarks/search_speed.py --threads 1 2 on 2 shared cores, 10^6 x 1536, one query: 0.56 s on one
    thread and 2.6 s on two at load average 5; 0.37 s and 0.27 s at load average 3).
    """
    num_gallery = len(gallery)
    if num_gallery == 0:
        raise ValueError("the gallery is empty: there is nothing to rank")
    if num_gallery > MAX_KEYED_COLUMNS:
        raise ValueError(f"the gallery has {num_gallery} rows; at most {MAX_KEYED_COLUMNS} are supported")
    queries = queries.float()
    device, num_queries = queries.device, len(queries)
    k = min(k, num_gallery)
    chunk_rows = chunk_rows or (CHUNK_ROWS if device.type == "cpu" else block_rows)
    block_rows = max(block_rows, chunk_rows)
    chunk = torch.empty(chunk_rows, queries.shape[1], device=device)
    scores = torch.empty(num_queries, min(block_rows, num_gallery), device=device)
    keys = torch.empty(scores.shape, dtype=torch.int64, device=device)
    best = torch.empty(num_queries, 0, dtype=torch.int64, device=device)
    with _cpu_threads(cpu_threads if device.type == "cpu" else None):
        for start in range(0, num_gallery, block_rows):
            stop = min(start + block_rows, num_gallery)
            for chunk_start in range(start, stop, chunk_rows):
                rows = _as_tensor(gallery[chunk_start:min(chunk_start + chunk_rows, stop)])
                converted = chunk[:len(rows)].copy_(rows)
                torch.mm(queries, converted.t(), out=scores[:, chunk_start - start:chunk_start - start + len(rows)])
            block, block_keys = scores[:, :stop - start], keys[:, :stop - start]
            key_scores(block, block, ranking_keys(block_keys, start))
            candidates = torch.cat([best, block_keys.topk(min(k, stop - start), dim=1).values], dim=1)
            best = candidates.topk(min(k, candidates.shape[1]), dim=1).values  # sorted: best first
    return TopK(*decode_ranking_keys(best))
