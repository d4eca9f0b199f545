"""Retrieval metrics (R@k, mAP, mINP) computed in query chunks, without sorting the similarity matrix.

Ranking convention: for each query row, gallery columns are ranked by similarity, highest first; among
equal scores the lower gallery index ranks first (a stable descending sort would give the same order).
Only the ranks of the positives are needed, and for a positive p

    rank(p) = 1 + #{k : s_k > s_p} + #{k < p : s_k == s_p},

so each chunk turns its scores into a strict total order (`ranking_keys`: one int64 key per score, the
score's bits mapped to an order-preserving integer, then the gallery index as tie-breaker), sorts just
the positives' keys, places every gallery key among them with one batched binary search, and counts.
That is O(G log P) per query instead of the O(G log G) of a full argsort, and memory grows with the
chunk, never with Q x G. retrieval/ranking.py's exact top-k ranks with the same keys.
"""

import sys

import torch
from torch import Tensor

# A chunk holds about this many similarity entries; its buffers take 20 bytes per entry (~80 MiB).
_CHUNK_ELEMENTS = 1 << 22
_PAD_KEY = torch.iinfo(torch.int64).max


def evaluate_ranking(
    similarity: Tensor,
    query_pids,
    gallery_pids,
    ks: tuple[int, ...] = (1, 5, 10),
    chunk_size: int | None = None,
) -> dict:
    """R@k, mAP and mINP in percent for ranking gallery columns per query row (ties: lower index first).

    R@k: fraction of queries with a positive in the top k. AP: mean over a query's positives of the
    precision at that positive's rank. mINP: mean over queries of (#positives / rank of the last one).
    Queries whose pid has no gallery positive are excluded from every metric and counted in
    ``num_excluded``; ``num_queries`` is the number of queries scored. For image-to-text pass
    ``similarity.t()`` with the pid arguments swapped. ``chunk_size`` (query rows per chunk) defaults
    to about 4M entries per chunk. Scores are compared in fp32 whatever the input dtype.
    """
    similarity, query_pids, gallery_pids, ks = _validate(similarity, query_pids, gallery_pids, ks, chunk_size)
    return _rank_in_chunks(lambda start, stop: similarity[start:stop], similarity.shape, similarity.device,
                           query_pids, gallery_pids, ks, chunk_size)


def evaluate_retrieval(
    query_features: Tensor,
    gallery_features: Tensor,
    query_pids,
    gallery_pids,
    ks: tuple[int, ...] = (1, 5, 10),
    chunk_size: int | None = None,
) -> dict:
    """evaluate_ranking on s = q . g^T (cosine similarity for L2-normalised features), one query chunk at a time.

    The Q x G matrix is never formed: each chunk's rows are one matrix product, so memory stays bounded.
    """
    if query_features.dim() != 2 or gallery_features.dim() != 2 or query_features.shape[1] != gallery_features.shape[1]:
        raise ValueError(
            f"features must be 2-D with the same width, got queries {tuple(query_features.shape)} "
            f"and gallery {tuple(gallery_features.shape)}"
        )
    shape = (query_features.shape[0], gallery_features.shape[0])
    shape_only = query_features.new_zeros((), dtype=torch.float32).expand(*shape)  # validates sides, no memory
    _, query_pids, gallery_pids, ks = _validate(shape_only, query_pids, gallery_pids, ks, chunk_size)
    gallery_t = gallery_features.float().t()
    return _rank_in_chunks(lambda start, stop: query_features[start:stop].float() @ gallery_t, shape,
                           query_features.device, query_pids, gallery_pids, ks, chunk_size)


def _rank_in_chunks(score_rows, shape, device, query_pids, gallery_pids, ks, chunk_size) -> dict:
    """The shared body: score_rows(start, stop) gives the similarity rows of queries start..stop-1."""
    num_q, num_g = shape
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_ELEMENTS // num_g)

    pos_table, pos_valid, pos_count, query_ident = _positive_table(query_pids, gallery_pids)
    # Buffers reused by every chunk: no allocator churn, and the peak stays one chunk's (20 B/entry).
    rows = min(chunk_size, num_q)
    values = torch.empty(rows, num_g, dtype=torch.float32, device=device)
    keys = torch.empty(rows, num_g, dtype=torch.int64, device=device)
    slot = torch.empty(rows, num_g, dtype=torch.int64, device=device)
    score_words = ranking_keys(keys)  # the tie-break halves are set once: chunks only write the score halves
    has_nan = torch.zeros((), dtype=torch.bool, device=device)
    best_ranks, aps, inps = [], [], []
    for start in range(0, num_q, chunk_size):
        scores = score_rows(start, start + chunk_size)
        n = len(scores)
        key_scores(scores, values[:n], score_words[:n])  # values: an fp32 copy, contiguous even for a transposed view
        has_nan |= values[:n].amax().isnan()  # amax propagates NaN: one pass instead of isnan + any
        ident = query_ident[start:start + chunk_size]
        pos_index, valid, count = (t.index_select(0, ident) for t in (pos_table, pos_valid, pos_count))
        ranks = _positive_ranks(keys[:n], pos_index, valid, out=slot[:n])
        best, ap, inp = _per_query_metrics(ranks, count)
        best_ranks.append(best)
        aps.append(ap)
        inps.append(inp)

    if has_nan.item():
        raise ValueError("similarity contains NaN; compute it from finite features (check for zero-norm rows)")
    scored = pos_count.index_select(0, query_ident) > 0
    num_scored = int(scored.sum())
    if num_scored == 0:
        raise ValueError(
            "no query pid occurs among the gallery pids, so nothing can be ranked; "
            "check that query_pids and gallery_pids use the same identity labels"
        )
    best_rank = torch.cat(best_ranks)
    metrics = {f"R{k}": ((best_rank <= k) & scored).sum() for k in ks}
    metrics["mAP"] = torch.cat(aps).masked_fill_(~scored, 0.0).sum()
    metrics["mINP"] = torch.cat(inps).masked_fill_(~scored, 0.0).sum()
    result = {name: float(value) * 100 / num_scored for name, value in metrics.items()}
    result["num_queries"] = num_scored
    result["num_excluded"] = num_q - num_scored
    return result


def _validate(similarity, query_pids, gallery_pids, ks, chunk_size):
    """Boundary checks: a 2-D floating matrix, 1-D integer pids matching its sides, positive ks/chunk."""
    if not isinstance(similarity, Tensor) or similarity.dim() != 2 or not similarity.is_floating_point():
        raise ValueError(
            "similarity must be a 2-D floating-point torch.Tensor (queries x gallery), got "
            f"{type(similarity).__name__} {getattr(similarity, 'shape', '')} {getattr(similarity, 'dtype', '')}"
        )
    num_q, num_g = similarity.shape
    if num_q == 0 or num_g == 0:
        raise ValueError(f"similarity has an empty side {tuple(similarity.shape)}; need >= 1 query and gallery item")
    pids = []
    for name, values, expected, side in (
        ("query_pids", query_pids, num_q, "rows"),
        ("gallery_pids", gallery_pids, num_g, "columns"),
    ):
        values = torch.as_tensor(values, device=similarity.device)
        if values.dim() != 1 or values.numel() != expected:
            raise ValueError(
                f"{name} has shape {tuple(values.shape)} but similarity has {expected} {side} "
                f"(shape {tuple(similarity.shape)}); pass one pid per {side[:-1]} "
                "(for image-to-text, transpose similarity and swap the pids)"
            )
        if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
            raise ValueError(f"{name} must hold integer identity labels, got dtype {values.dtype}")
        pids.append(values.long())
    ks = tuple(ks)
    if not ks or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of positive ints, got {ks!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return similarity, pids[0], pids[1], ks


def _positive_table(query_pids: Tensor, gallery_pids: Tensor):
    """Per identity, the gallery indices of its images, padded to the largest identity (one host sync)."""
    num_g = gallery_pids.numel()
    ids, gallery_ident, counts = torch.unique(gallery_pids, return_inverse=True, return_counts=True)
    width = int(counts.max())
    by_ident = torch.argsort(gallery_ident, stable=True)
    starts = counts.cumsum(0) - counts
    slot = torch.arange(width, device=gallery_pids.device)
    table = by_ident.take((starts[:, None] + slot).clamp_(max=num_g - 1))
    valid = slot < counts[:, None]
    # One extra all-invalid row for queries whose pid is absent from the gallery.
    table = torch.cat([table, table.new_zeros(1, width)])
    valid = torch.cat([valid, valid.new_zeros(1, width)])
    counts = torch.cat([counts, counts.new_zeros(1)])
    where = torch.searchsorted(ids, query_pids).clamp_(max=ids.numel() - 1)
    query_ident = torch.where(ids.take(where) == query_pids, where, ids.numel())
    return table, valid, counts, query_ident


# Ranking keys: one int64 per (query, gallery column) whose descending order is the ranking. The high 32 bits hold
# the score's order-preserving integer (order_bits), the low 32 bits MAX_KEYED_COLUMNS - index, so that among equal
# scores the lower index has the larger key. One key per score makes the order strict, so a sort, a binary search or
# torch.topk (which does not order ties) all give the same ranking.
MAX_KEYED_COLUMNS = (1 << 32) - 1
_HIGH_WORD = 1 if sys.byteorder == "little" else 0  # the int32 half of an int64 holding its high bits


def ranking_keys(keys: Tensor, first_index: int = 0) -> Tensor:
    """Make an int64 (rows, n) buffer the ranking keys of gallery columns first_index.. and return their score halves.

    Sets the tie-break (low) half of every key; the returned int32 view of the high halves is what key_scores fills,
    so a buffer reused for many rows of scores of the same columns needs this call once.
    """
    num_columns = keys.shape[-1]
    if first_index < 0 or first_index + num_columns > MAX_KEYED_COLUMNS:
        raise ValueError(f"gallery columns {first_index}..{first_index + num_columns - 1}: ranking keys tell apart "
                         f"at most {MAX_KEYED_COLUMNS} columns")
    columns = torch.arange(first_index, first_index + num_columns, device=keys.device)
    keys.copy_(MAX_KEYED_COLUMNS - columns)  # high halves 0 until key_scores writes them
    return keys.view(torch.int32).view(*keys.shape, 2)[..., _HIGH_WORD]


def key_scores(scores: Tensor, values: Tensor, score_words: Tensor) -> None:
    """Write scores into the score halves of their ranking keys (ranking_keys' view), through values.

    values: an fp32 buffer of scores' shape (scores itself when it is one) that is left holding the scores in fp32
    with -0.0 made +0.0: the two compare equal, so their keys must tie too.
    """
    torch.add(scores, 0.0, out=values)
    order_bits(values.view(torch.int32), out=score_words)


def decode_ranking_keys(keys: Tensor) -> tuple[Tensor, Tensor]:
    """The fp32 scores and int64 gallery indices that int64 ranking keys stand for."""
    indices = MAX_KEYED_COLUMNS - (keys & MAX_KEYED_COLUMNS)
    score_bits = torch.empty(keys.shape, dtype=torch.int32, device=keys.device)
    order_bits(keys.bitwise_right_shift(32).int(), out=score_bits)  # order_bits is its own inverse
    return score_bits.view(torch.float32), indices


def top_ranked(scores: Tensor, k: int) -> Tensor:
    """Gallery indices of the k best scores of each row (rows, n), in the metrics' ranking order (ties: lower index
    first)."""
    keys = torch.empty(scores.shape, dtype=torch.int64, device=scores.device)
    key_scores(scores, torch.empty(scores.shape, dtype=torch.float32, device=scores.device), ranking_keys(keys))
    return decode_ranking_keys(keys.topk(min(k, scores.shape[-1]), dim=-1).values)[1]


def order_bits(bits: Tensor, out: Tensor) -> Tensor:
    """Map fp32 bit patterns to int32 that order like the floats (the high word of each int64 key).

    The map is its own inverse, so order_bits(order_bits(b)) == b gives the float back.
    """
    # IEEE floats order like sign-magnitude ints; flipping the magnitude bits of negatives makes
    # them order like two's-complement ints, so integer comparison equals float comparison.
    torch.bitwise_right_shift(bits, 31, out=out)
    return out.bitwise_and_(0x7FFFFFFF).bitwise_xor_(bits)


def _positive_ranks(keys: Tensor, pos_index: Tensor, pos_valid: Tensor, out: Tensor) -> Tensor:
    """1-based rank of each positive, worst first; padding slots (j >= #positives) are meaningless."""
    num_rows, num_g = keys.shape
    width = pos_index.shape[1]
    pos_keys = keys.gather(1, pos_index).masked_fill_(~pos_valid, _PAD_KEY).sort(dim=1).values
    # slot[k] = number of positive keys below key k; k ranks above the j-th worst positive iff slot[k] > j.
    slot = torch.searchsorted(pos_keys, keys, out=out)
    ones = torch.ones((), dtype=torch.int64, device=slot.device).expand(num_rows, num_g)
    hist = torch.zeros(num_rows, width + 1, dtype=torch.int64, device=slot.device).scatter_add_(1, slot, ones)
    return num_g - hist.cumsum(1)[:, :width] + 1


def _per_query_metrics(ranks: Tensor, pos_count: Tensor):
    """Best positive rank, AP and INP per query from its positives' ranks (worst first)."""
    width = ranks.shape[1]
    # Ranks are distinct, so the j-th worst of n positives has exactly n - j positives at or above it;
    # slots j >= n are padding and get zero precision.
    at_or_above = (pos_count[:, None] - torch.arange(width, device=ranks.device)).clamp_(min=0).double()
    precision = at_or_above / ranks.double()
    count = pos_count.clamp(min=1).double()
    ap = precision.sum(1) / count
    inp = count / ranks[:, 0].double()
    best = ranks.gather(1, (pos_count - 1).clamp_(min=0)[:, None]).squeeze(1)
    return best, ap, inp
