"""Objectives of docs/method.md §5: hand-computed small cases, the loop reference, ranking-loss rules, one-identity batches."""
import math

import torch

from models.objectives import cmpc_loss, cmpm_loss, diversity_loss, ranking_loss
from tests import cfine_reference as ref
from tests.tolerance import assert_close, assert_each_close

# fp32 roundings relative to the largest entry (tests/tolerance.py); the hand-computed values are float64. Measured
# at most 6.2e-7 over the CPU settings of tests/tolerance.py.
REL = 1e-5


def _close(actual, expected):
    assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), REL)


def _leaves(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).requires_grad_() for s in shapes]


def _kl_row(logits, target):
    """sum_j p_j (log p_j - log(q_j + 1e-8)), computed with math on python floats."""
    z = sum(math.exp(v) for v in logits)
    p = [math.exp(v) / z for v in logits]
    return sum(pj * (math.log(pj) - math.log(qj + 1e-8)) for pj, qj in zip(p, target))


# ------------------------------------------------------------------ CMPM


def test_cmpm_two_samples_by_hand():
    img = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    # image->text logits: img @ unit(txt)^T = [[2, 0], [0, 1]]; text->image: txt @ unit(img)^T = [[1, 0], [0, 3]]
    distinct = (_kl_row([2, 0], [1, 0]) + _kl_row([0, 1], [0, 1])) / 2 + (
        _kl_row([1, 0], [1, 0]) + _kl_row([0, 3], [0, 1])
    ) / 2
    _close(cmpm_loss(img, txt, torch.tensor([4, 7])), distinct)
    # One identity: q = 1 / sqrt(2) everywhere (the L2-normalised mask, not a distribution).
    q = [1 / math.sqrt(2)] * 2
    shared = (_kl_row([2, 0], q) + _kl_row([0, 1], q)) / 2 + (_kl_row([1, 0], q) + _kl_row([0, 3], q)) / 2
    _close(cmpm_loss(img, txt, torch.tensor([5, 5])), shared)


def test_cmpm_three_samples_two_of_one_identity_by_hand():
    img = torch.eye(3)
    txt = torch.eye(3)
    q_shared, q_alone = [1 / math.sqrt(2), 1 / math.sqrt(2), 0], [0, 0, 1]
    per_direction = (_kl_row([1, 0, 0], q_shared) + _kl_row([0, 1, 0], q_shared) + _kl_row([0, 0, 1], q_alone)) / 3
    _close(cmpm_loss(img, txt, torch.tensor([1, 1, 2])), 2 * per_direction)


def test_cmpm_matches_reference_values_and_gradients():
    img, txt = _leaves((7, 12), (7, 12))
    pids = torch.tensor([0, 1, 1, 2, 3, 3, 3])
    vectorised, reference = cmpm_loss(img, txt, pids), ref.cmpm(img, txt, pids)
    _close(vectorised, reference)
    assert_each_close(torch.autograd.grad(vectorised, (img, txt)), torch.autograd.grad(reference, (img, txt)), REL)


# ------------------------------------------------------------------ CMPC


def test_cmpc_two_samples_by_hand():
    weight = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # columns normalise to the identity
    img = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    txt = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    # image 0 on unit(txt 0): (2/sqrt2) * [1, 1]/sqrt2 = [1, 1]; image 1 on e2: [0, 3]
    image_ce = (math.log(2) + math.log(1 + math.exp(-3))) / 2
    # text 0 on e1: [1, 0] (label 0); text 1 on e2: [0, 1] (label 1)
    text_ce = math.log(1 + math.exp(-1))
    _close(cmpc_loss(img, txt, torch.tensor([0, 1]), weight), image_ce + text_ce)


def test_cmpc_matches_reference_values_and_gradients():
    img, txt, weight = _leaves((6, 10), (6, 10), (10, 4), seed=1)
    pids = torch.tensor([0, 3, 3, 1, 2, 0])
    vectorised, reference = cmpc_loss(img, txt, pids, weight), ref.cmpc(img, txt, pids, weight)
    _close(vectorised, reference)
    inputs = (img, txt, weight)
    assert_each_close(torch.autograd.grad(vectorised, inputs), torch.autograd.grad(reference, inputs), REL)


# ------------------------------------------------------------------ diversity


def test_diversity_two_samples_by_hand_and_finite_gradient_when_orthogonal():
    parts = torch.tensor([[[3.0, 0.0], [0.0, 2.0]], [[1.0, 0.0], [1.0, 1.0]]], requires_grad=True)
    # sample 0: orthogonal -> 0; sample 1: cos = 1/sqrt2 twice off the diagonal -> ||G||_F = 1, / 2^2
    loss = diversity_loss(parts)
    _close(loss, (0.0 + 0.25) / 2)
    (grad,) = torch.autograd.grad(loss, parts)
    assert torch.isfinite(grad).all() and grad[0].abs().max() == 0


def test_diversity_matches_reference_values_and_gradients():
    (parts,) = _leaves((5, 2, 9), seed=2)
    vectorised, reference = diversity_loss(parts), ref.diversity(parts)
    _close(vectorised, reference)
    _close(torch.autograd.grad(vectorised, parts)[0], torch.autograd.grad(reference, parts)[0])


# ------------------------------------------------------------------ ranking


def _ranking_and_grad(values, pids):
    sim = torch.tensor(values, requires_grad=True)
    loss = ranking_loss(sim, torch.tensor(pids), margin=0.2)
    (grad,) = torch.autograd.grad(loss, sim)
    return loss, grad


def test_ranking_three_samples_by_hand():
    # rows: anchor 0 has hardest negative 0.7 > 0.5 -> 0.2 - 0.5 + 0.7; others do not count.
    # columns: no anchor counts -> fallback: last column 2, first negative 0: relu(0.2 - 0.6 + 0.5) = 0.1.
    values = [[0.5, 0.7, 0.5], [0.2, 0.9, 0.3], [0.4, 0.45, 0.6]]
    loss, grad = _ranking_and_grad(values, [0, 1, 2])
    _close(loss, 0.4 + 0.1)
    expected = torch.zeros(3, 3)
    expected[0, 0], expected[0, 1] = -1, 1  # row triplet
    expected[2, 2] -= 1
    expected[0, 2] += 1  # column fallback: S^T[2, 0] = S[0, 2]
    _close(grad, expected)


def test_ranking_fallback_when_no_anchor_counts():
    values = [[0.5, 0.4, 0.4], [0.4, 0.5, 0.4], [0.4, 0.4, 0.5]]
    loss, grad = _ranking_and_grad(values, [0, 1, 2])
    _close(loss, 2 * (0.2 - 0.5 + 0.4))  # one fallback triplet per direction
    expected = torch.zeros(3, 3)
    expected[2, 2], expected[2, 0], expected[0, 2] = -2, 1, 1
    _close(grad, expected)
    # The fallback is a relu: a last anchor far above its first negative adds nothing.
    loss, _ = _ranking_and_grad([[1.0, 0.0], [0.0, 1.0]], [0, 1])
    _close(loss, 0.0)


def test_ranking_ties_do_not_count_and_tied_negatives_take_the_first_index():
    # Row 0: negative 0.5 ties the positive 0.5 -> does not count. Row 1: two negatives tie at 0.8 > 0.3.
    values = [[0.5, 0.5, 0.1], [0.8, 0.3, 0.8], [0.0, 0.0, 0.9]]
    loss, grad = _ranking_and_grad(values, [0, 1, 2])
    # columns: col 0 pos 0.5, negatives 0.8, 0.0 -> counts (0.2 - 0.5 + 0.8); col 1 pos 0.3, neg 0.5 -> counts
    # (0.2 - 0.3 + 0.5); col 2 pos 0.9, negatives 0.1, 0.8 -> no.
    _close(loss, (0.2 - 0.3 + 0.8) + (0.2 - 0.5 + 0.8) + (0.2 - 0.3 + 0.5))
    assert grad[1, 0] == 1 + 1 and grad[1, 2] == 0  # row 1's tie goes to the first index, column 0 adds one


def test_ranking_several_samples_of_one_identity():
    # Sample 1 shares id 0 with sample 0: S[0, 1] = 0.9 is not a negative of anchor 0.
    values = [[0.5, 0.9, 0.6], [0.3, 0.4, 0.2], [0.1, 0.2, 0.7]]
    loss, grad = _ranking_and_grad(values, [0, 0, 1])
    # rows: anchor 0 -> 0.2 - 0.5 + 0.6 = 0.3; columns: none count -> fallback col 2, first negative 0:
    # 0.2 - 0.7 + S[0, 2] = 0.1
    _close(loss, 0.3 + 0.1)
    assert grad[0, 1] == 0


def test_ranking_matches_reference_values_and_gradients():
    g = torch.Generator().manual_seed(3)
    pids = torch.tensor([0, 1, 1, 2, 3, 3, 4, 5])
    for scale in (0.1, 1.0, 10.0):  # from "everything counts" to "only the fallback"
        sim = (torch.randn(8, 8, generator=g) + scale * torch.eye(8)).requires_grad_()
        vectorised, reference = ranking_loss(sim, pids), ref.ranking(sim, pids)
        _close(vectorised, reference)
        _close(torch.autograd.grad(vectorised, sim)[0], torch.autograd.grad(reference, sim)[0])


# ------------------------------------------------------------------ one identity in the whole batch


def test_one_identity_batch_is_defined_and_finite():
    """Documented: with no negatives the ranking loss is 0 (no triplet, no fallback); CMPM/CMPC stay defined."""
    img, txt, weight, sim = _leaves((4, 6), (4, 6), (6, 3), (4, 4), seed=4)
    pids = torch.zeros(4, dtype=torch.long)
    losses = [cmpm_loss(img, txt, pids), cmpc_loss(img, txt, pids, weight), ranking_loss(sim, pids)]
    _close(losses[2], 0.0)
    for loss in losses:
        assert torch.isfinite(loss)
    grads = torch.autograd.grad(sum(losses), (img, txt, weight, sim))
    assert all(torch.isfinite(g).all() for g in grads)
    assert grads[3].abs().max() == 0


def test_cmpc_over_several_features_equals_one_call_per_feature():
    img, txt, weight = _leaves((5, 3, 8), (5, 3, 8), (8, 4), seed=5)
    pids = torch.tensor([0, 1, 2, 3, 1])
    per_feature = cmpc_loss(img, txt, pids, weight)
    assert per_feature.shape == (3,)
    for n in range(3):
        _close(per_feature[n], cmpc_loss(img[:, n], txt[:, n], pids, weight))
        _close(per_feature[n], ref.cmpc(img[:, n], txt[:, n], pids, weight))
