"""evaluate_ranking against a per-query brute force written from the metric definitions."""

import pytest
import torch

from evaluation.metrics import (
    MAX_KEYED_COLUMNS,
    decode_ranking_keys,
    evaluate_ranking,
    evaluate_retrieval,
    key_scores,
    ranking_keys,
    top_ranked,
)

KS = (1, 2, 5, 10, 1000)


def brute_force(similarity, query_pids, gallery_pids, ks):
    """Sort every row in Python by (score desc, gallery index asc) and apply the definitions."""
    rows = similarity.float().tolist()
    query_pids, gallery_pids = list(query_pids), list(gallery_pids)
    hits = {k: 0 for k in ks}
    ap_sum = inp_sum = 0.0
    scored = excluded = 0
    for scores, pid in zip(rows, query_pids):
        order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
        ranks = [r for r, j in enumerate(order, start=1) if gallery_pids[j] == pid]
        if not ranks:
            excluded += 1
            continue
        scored += 1
        for k in ks:
            hits[k] += ranks[0] <= k
        ap_sum += sum(t / r for t, r in enumerate(ranks, start=1)) / len(ranks)
        inp_sum += len(ranks) / ranks[-1]
    expected = {f"R{k}": 100.0 * hits[k] / scored for k in ks}
    expected.update(mAP=100.0 * ap_sum / scored, mINP=100.0 * inp_sum / scored)
    expected.update(num_queries=scored, num_excluded=excluded)
    return expected


def assert_same(result, expected):
    assert result.keys() == expected.keys()
    for name, value in expected.items():
        assert isinstance(result[name], type(value)), name
        assert result[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name


def random_case(seed, num_q=37, num_g=53, dtype=torch.float32, integer_scores=True):
    """Many ties (a few integer levels, negatives included), 1-12 positives, some queries without any."""
    gen = torch.Generator().manual_seed(seed)
    gallery_pids = torch.tensor([-7, 3, 12, 40, 41, 1000])[torch.randint(0, 6, (num_g,), generator=gen)]
    # 99 and 5 never occur in the gallery, so those queries must be excluded.
    query_pids = torch.tensor([-7, 3, 12, 40, 41, 1000, 99, 5])[torch.randint(0, 8, (num_q,), generator=gen)]
    if integer_scores:
        similarity = torch.randint(-3, 4, (num_q, num_g), generator=gen).to(dtype)
    else:
        similarity = torch.randn(num_q, num_g, generator=gen).to(dtype)
    return similarity, query_pids, gallery_pids


@pytest.mark.parametrize("chunk_size", [1, 4, 10, 36, 37, 500, None])
def test_matches_brute_force_with_ties(chunk_size):
    similarity, query_pids, gallery_pids = random_case(seed=chunk_size or 0)
    expected = brute_force(similarity, query_pids, gallery_pids, KS)
    assert 0 < expected["num_excluded"] < len(query_pids)
    assert_same(evaluate_ranking(similarity, query_pids, gallery_pids, KS, chunk_size=chunk_size), expected)


def test_matches_brute_force_continuous_scores():
    similarity, query_pids, gallery_pids = random_case(seed=3, num_q=50, num_g=41, integer_scores=False)
    expected = brute_force(similarity, query_pids, gallery_pids, KS)
    assert_same(evaluate_ranking(similarity, query_pids, gallery_pids, KS, chunk_size=7), expected)


def test_hand_computed_3x4():
    # Gallery pids [1, 2, 1, 3]. Ranks (score desc, then lower index first):
    #   q0 (pid 1): order 3, 1, 2, 0 -> positives 2 and 0 at ranks 3, 4 (the 0.5 tie puts index 1 first)
    #   q1 (pid 3): all tied, order 0, 1, 2, 3 -> positive 3 at rank 4
    #   q2 (pid 2): order 2, 1, ... -> positive 1 at rank 2
    similarity = torch.tensor([[0.2, 0.5, 0.5, 0.8], [0.3, 0.3, 0.3, 0.3], [0.0, 0.7, 0.9, -0.0]])
    result = evaluate_ranking(similarity, [1, 3, 2], [1, 2, 1, 3], ks=(1, 3, 5), chunk_size=2)
    ap = [(1 / 3 + 2 / 4) / 2, 1 / 4, 1 / 2]
    inp = [2 / 4, 1 / 4, 1 / 2]
    assert result["R1"] == 0.0
    assert result["R3"] == pytest.approx(100 * 2 / 3, rel=1e-12)
    assert result["R5"] == 100.0
    assert result["mAP"] == pytest.approx(100 * sum(ap) / 3, rel=1e-12)
    assert result["mINP"] == pytest.approx(100 * sum(inp) / 3, rel=1e-12)
    assert (result["num_queries"], result["num_excluded"]) == (3, 0)


def test_signed_zeros_tie():
    # -0.0 == 0.0, so the tie goes to the lower index and the positive (index 1) ranks second.
    result = evaluate_ranking(torch.tensor([[-0.0, 0.0]]), [6], [5, 6], ks=(1,))
    assert result["R1"] == 0.0 and result["mAP"] == 50.0


def test_ranking_keys_sort_like_the_stable_descending_sort_and_decode():
    # Signed zeros, infinities, the smallest subnormals and repeated values: the keys' order is the ranking's.
    scores = torch.tensor([[0.5, -0.0, 0.0, -1.5, 0.5, float("inf"), -float("inf"), 1e-45, -1e-45, -1.5],
                           [-0.0, -0.0, 2.0, 0.0, -2.0, 2.0, 1e-45, -1e-45, 0.0, 3.0]])
    for given in (scores, scores.bfloat16()):  # any float dtype in, fp32 values out
        keys, values = torch.empty(scores.shape, dtype=torch.int64), torch.empty(scores.shape)
        key_scores(given, values, ranking_keys(keys, first_index=7))
        expected = torch.sort(given.float(), dim=1, descending=True, stable=True)
        ranked = keys.sort(dim=1, descending=True)
        assert torch.equal(ranked.indices, expected.indices) and all(len(set(row)) == len(row) for row in keys.tolist())
        decoded, indices = decode_ranking_keys(ranked.values)
        assert torch.equal(indices, expected.indices + 7) and torch.equal(values, given.float())
        assert torch.equal(decoded, expected.values) and not decoded[decoded == 0].signbit().any()
    with pytest.raises(ValueError, match="at most"):
        ranking_keys(torch.empty(1, 2, dtype=torch.int64), first_index=MAX_KEYED_COLUMNS - 1)


@pytest.mark.parametrize("integer_scores", [True, False])
def test_bf16_input_compared_in_fp32(integer_scores):
    similarity, query_pids, gallery_pids = random_case(seed=5, dtype=torch.bfloat16, integer_scores=integer_scores)
    expected = brute_force(similarity, query_pids, gallery_pids, KS)
    assert_same(evaluate_ranking(similarity, query_pids, gallery_pids, KS, chunk_size=6), expected)


def test_image_to_text_transposed():
    similarity, query_pids, gallery_pids = random_case(seed=11, num_q=45, num_g=29)
    transposed = similarity.t()
    assert not transposed.is_contiguous()
    expected = brute_force(transposed, gallery_pids, query_pids, KS)
    assert expected["num_excluded"] == 0
    assert_same(evaluate_ranking(transposed, gallery_pids, query_pids, KS, chunk_size=8), expected)


def test_evaluate_retrieval_ranks_feature_dot_products():
    gen = torch.Generator().manual_seed(2)
    queries, gallery = torch.randn(23, 6, generator=gen), torch.randn(31, 6, generator=gen)
    query_pids, gallery_pids = torch.randint(0, 5, (23,), generator=gen), torch.randint(0, 5, (31,), generator=gen)
    similarity = queries @ gallery.T  # the reference must rank the very same fp32 products
    assert_same(evaluate_retrieval(queries, gallery, query_pids, gallery_pids, KS, chunk_size=4),
                brute_force(similarity, query_pids, gallery_pids, KS))
    with pytest.raises(ValueError, match="same width"):
        evaluate_retrieval(queries, gallery[:, :5], query_pids, gallery_pids)


def test_invalid_inputs_raise_clear_errors():
    similarity = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="query_pids has shape"):
        evaluate_ranking(similarity, [1, 2], [1, 2, 3, 4])
    with pytest.raises(ValueError, match="gallery_pids has shape"):
        evaluate_ranking(similarity, [1, 2, 3], [1, 2, 3])
    with pytest.raises(ValueError, match="2-D floating-point"):
        evaluate_ranking(torch.zeros(4), [1], [1, 2, 3, 4])
    with pytest.raises(ValueError, match="integer identity labels"):
        evaluate_ranking(similarity, [1.0, 2.0, 3.0], [1, 2, 3, 4])
    with pytest.raises(ValueError, match="no query pid"):
        evaluate_ranking(similarity, [7, 8, 9], [1, 2, 3, 4])
    with pytest.raises(ValueError, match="NaN"):
        evaluate_ranking(torch.tensor([[0.0, float("nan")]]), [1], [1, 2])
    with pytest.raises(ValueError, match="chunk_size"):
        evaluate_ranking(similarity, [1, 2, 3], [1, 2, 3, 4], chunk_size=0)
    with pytest.raises(ValueError, match="ks"):
        evaluate_ranking(similarity, [1, 2, 3], [1, 2, 3, 4], ks=(0,))


def test_top_ranked_orders_like_the_stable_descending_sort_with_ties_and_signed_zeros():
    scores = torch.tensor([[0.5, -0.0, 0.9, 0.5, 0.0, 0.9, -1.0], [1.0, 1.0, 1.0, -2.0, 3.0, 0.0, -0.0]])
    expected = torch.sort(scores + 0.0, dim=-1, descending=True, stable=True).indices[:, :5]  # -0.0 + 0.0 = +0.0
    assert torch.equal(top_ranked(scores, 5), expected)
    assert top_ranked(scores, 99).shape == (2, 7)
