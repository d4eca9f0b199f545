"""The CFine head end to end (docs/method.md §2-5) on random encoder tokens: reference parity, equivariance, AMP, edge cases."""
import pytest
import torch

from clip.model import CLIPConfig
from models import CFineConfig, CFineHead
from models.similarity import cross_grained_similarity, fine_grained_similarity
from tests import cfine_reference as ref
from tests.tolerance import assert_close, assert_each_close

pytestmark = pytest.mark.usefixtures("single_thread")

WIDTH, IMAGE_TOKENS, TEXT_LENGTH = 64, 50, 77
PARTS = ("cmpm", "cmpc", "diversity", "ranking")


# fp32 roundings in another summation order, relative to the largest entry (tests/tolerance.py). Measured at most,
# over the CPU settings of tests/tolerance.py: 9.4e-7 for features and similarities; 1.5e-6 for the losses (the
# ranking loss sums margin - s_pos + s_neg over triplets: similarities of order 1/tau cancel to a loss of their own
# order); 1.4e-6 for the gradients, scaled as below.
REL = 1e-5
REL_LOSS = 2e-5
REL_GRAD = 2e-5


def _close(actual, expected):
    assert_close(actual, expected, REL)


def _head(seed=0, num_classes=6):
    torch.manual_seed(seed)
    head = CFineHead(CFineConfig(clip=CLIPConfig.tiny(width=WIDTH), num_classes=num_classes)).train()
    with torch.no_grad():  # move BN and LayerNorm off their identity initialisation
        for name, param in head.named_parameters():
            if "ln_" in name or "bn" in name:
                param.add_(0.1 * torch.randn_like(param))
    return head


def _inputs(batch=8, seed=0):
    """Padded captions of varied length (EOT from 3 to 60) and near-duplicate pairs, so triplets count."""
    g = torch.Generator().manual_seed(seed)
    eot = torch.randint(3, 60, (batch,), generator=g)
    eot[0] = 3  # fewer real words than 2k: padding gets selected
    image = ref.near_duplicate_pairs(ref.random_image_tokens(batch, IMAGE_TOKENS, WIDTH, g), 0.3, g)
    text = ref.near_duplicate_pairs(ref.random_text_tokens(batch, TEXT_LENGTH, WIDTH, eot, g), 0.3, g)
    return image, text


def _with_leaf_tokens(image, text):
    return image._replace(tokens=image.tokens.clone().requires_grad_()), text._replace(
        tokens=text.tokens.clone().requires_grad_()
    )


def test_head_matches_loop_reference_values_and_gradients():
    head = _head()
    pids = torch.tensor([0, 1, 2, 3, 3, 4, 5, 5])
    image, text = _with_leaf_tokens(*_inputs())
    out = head(image, text, pids)
    image_r, text_r = _with_leaf_tokens(*_inputs())
    reference = ref.head_losses(head, image_r, text_r, pids)
    _close(out.image_features, reference["image_features"])
    _close(out.text_features, reference["text_features"])
    for name in PARTS:
        assert_close(out.losses[name], reference[name].detach(), REL_LOSS, what=name)
    assert reference["ranking"] > 0  # the triplet path is exercised, not only the fallback
    params = [p for p in head.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.loss, [image.tokens, text.tokens, *params])
    ref_grads = torch.autograd.grad(reference["loss"], [image_r.tokens, text_r.tokens, *params])
    # A gradient inherits the rounding error of the larger activations and gradients upstream: each is scaled by at
    # least 1/10 of the largest gradient (the MLP bias before BN has an exact gradient of 0, BN cancels it: noise only).
    assert_each_close(grads, ref_grads, REL_GRAD, floor=1e-1)


def test_training_similarity_matches_reference():
    head = _head(seed=1)
    image, text = _inputs(seed=1)
    branch_i = head._branch(image, head.image_bn, is_text=False)
    branch_t = head._branch(text, head.text_bn, is_text=True)
    _close(head.similarity(branch_i, branch_t), ref.head_losses(head, image, text, torch.arange(8) % 6)["similarity"])


def test_features_and_similarity_are_batch_permutation_equivariant():
    head = _head(seed=2)
    image, text = _inputs(seed=2)
    perm = torch.randperm(8)
    permuted = [feats._replace(**{f: getattr(feats, f)[perm] for f in feats._fields if getattr(feats, f) is not None})
                for feats in (image, text)]
    out, out_p = head(image, text), head(*permuted)
    _close(out_p.image_features, out.image_features[perm])
    _close(out_p.text_features, out.text_features[perm])

    def similarity(i, t):
        return head.similarity(head._branch(i, head.image_bn, False), head._branch(t, head.text_bn, True))

    _close(similarity(*permuted), similarity(image, text)[perm][:, perm])


def test_one_identity_batch_gives_finite_loss_and_zero_ranking():
    head = _head(seed=3, num_classes=3)
    image, text = _with_leaf_tokens(*_inputs(seed=3))
    out = head(image, text, torch.full((8,), 2))
    assert out.losses["ranking"] == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    assert torch.isfinite(image.tokens.grad).all() and torch.isfinite(text.tokens.grad).all()


def test_no_loss_in_eval_mode_or_without_pids():
    head = _head(seed=4)
    image, text = _inputs(seed=4)
    assert head(image, text).loss is None
    head.eval()
    out = head(image, text, torch.arange(8))
    assert out.loss is None and out.losses == {} and out.image_features.shape == (8, 3, WIDTH)
    _close(head.image_features(image), out.image_features)
    _close(head.text_features(text), out.text_features)


@pytest.mark.parametrize("seed", [0, 1])
def test_bf16_autocast_losses_close_to_fp32_with_finite_gradients(seed):
    head = _head(seed=seed)
    image, text = _inputs(seed=seed)
    pids = torch.tensor([0, 1, 2, 3, 3, 4, 5, 5])
    fp32 = head(image, text, pids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = head(image, text, pids)
    assert mixed.loss.dtype == torch.float32
    for name in PARTS:
        assert_close(mixed.losses[name], fp32.losses[name], 1e-3, what=name)  # measured at most 8.7e-5
    mixed.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters() if p.grad is not None)


def test_similarities_run_in_fp32_under_autocast():
    a, b = torch.randn(4, 6, 16).bfloat16(), torch.randn(4, 5, 16).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fine = fine_grained_similarity(a, b)
        cross = cross_grained_similarity(a[:, 0], a, b[:, 0], b)
    assert fine.dtype == cross.dtype == torch.float32
    _close(fine, fine_grained_similarity(a.float(), b.float()))
