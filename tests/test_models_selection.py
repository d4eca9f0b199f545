"""MGF token selection (docs/method.md §2): batched top-k gather against the per-sample reference, and its rules."""
import torch

from models.selection import image_candidates, select_tokens, selection_indices, text_candidates, text_padding_mask
from tests import cfine_reference as ref


def _position_tokens(batch: int, length: int) -> torch.Tensor:
    """Token (b, n) carries its own position n in channel 0 and its sample b in channel 1."""
    tokens = torch.zeros(batch, length, 2)
    tokens[..., 0] = torch.arange(length).float()
    tokens[..., 1] = torch.arange(batch).float().unsqueeze(1)
    return tokens


def test_text_selection_matches_reference_with_padded_captions():
    g = torch.Generator().manual_seed(1)
    eot = torch.tensor([3, 9, 20, 40, 76, 17])
    feats = ref.random_text_tokens(6, 77, 8, eot, g)
    k = 15
    group1, group2, selected = select_tokens(
        feats.tokens, feats.global_attention, k, text_candidates(feats.global_index, 77)
    )
    assert group1.shape == (6, k, 8) and group2.shape == (6, k, 8) and selected.shape == (6, 2 * k, 8)
    for b in range(6):
        candidates = [n for n in range(77) if n not in (0, int(eot[b]))]
        r1, r2, rs, _ = ref.select(feats.tokens[b], feats.global_attention[b], k, candidates)
        assert torch.equal(group1[b], r1) and torch.equal(group2[b], r2) and torch.equal(selected[b], rs)


def test_global_token_and_sot_are_never_selected_even_with_top_scores():
    eot = torch.tensor([5, 30])
    scores = torch.rand(2, 77)
    scores[:, 0] = 10.0  # SOT, the attention sink
    scores[torch.arange(2), eot] = 20.0
    index = selection_indices(scores, 15, text_candidates(eot, 77))
    assert not (index == 0).any()
    assert not (index == eot.unsqueeze(1)).any()
    image_scores = torch.rand(3, 197)
    image_scores[:, 0] = 5.0
    image_index = selection_indices(image_scores, 19, image_candidates(3, 197))
    assert image_index.shape == (3, 38) and not (image_index == 0).any()


def test_selection_follows_the_attention_scores():
    scores = torch.rand(4, 50)
    tokens = _position_tokens(4, 50)
    group1, group2, _ = select_tokens(tokens, scores, 5, image_candidates(4, 50))
    masked = scores.clone()
    masked[:, 0] = -1
    order = masked.argsort(dim=1, descending=True)
    assert torch.equal(group1[..., 0].long(), order[:, :5])
    assert torch.equal(group2[..., 0].long(), order[:, 5:10])
    assert torch.equal(group1[..., 1], torch.arange(4).float().unsqueeze(1).expand(4, 5))  # no cross-sample gather
    chosen = scores.gather(1, group1[..., 0].long())
    assert (chosen[:, :-1] >= chosen[:, 1:]).all()  # descending within group 1
    assert (chosen.min(dim=1).values >= scores.gather(1, group2[..., 0].long()).max(dim=1).values).all()


def test_padding_is_picked_last_and_in_position_order_for_short_captions():
    eot = torch.tensor([4])  # SOT, 3 words, EOT: only 3 real candidates for 2k = 30 slots
    feats = ref.random_text_tokens(1, 77, 2, eot)
    index = selection_indices(feats.global_attention, 15, text_candidates(eot, 77))[0]
    assert sorted(index[:3].tolist()) == [1, 2, 3]
    assert index[3:].tolist() == list(range(5, 32))
    assert text_padding_mask(eot, 77)[0].nonzero().squeeze(1).tolist() == list(range(5, 77))


def test_gradient_reaches_only_selected_tokens():
    tokens = torch.randn(2, 20, 4, requires_grad=True)
    scores = torch.rand(2, 20)
    _, _, selected = select_tokens(tokens, scores, 3, image_candidates(2, 20))
    selected.sum().backward()
    index = selection_indices(scores, 3, image_candidates(2, 20))
    expected = torch.zeros(2, 20).scatter_(1, index, 1.0)
    assert torch.equal(tokens.grad[..., 0], expected)
