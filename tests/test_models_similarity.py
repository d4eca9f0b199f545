"""CFR and FCD similarities (docs/method.md §3-4): vectorised versions against the loop reference, values and gradients."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from models.similarity import cross_grained_similarity, fine_grained_similarity
from tests import cfine_reference as ref
from tests.tolerance import assert_close, assert_each_close

# fp32 roundings in another summation order, relative to the largest entry (tests/tolerance.py): the values and
# gradients scale with 1/tau, so an absolute bound would hold at one temperature and one CPU only. Measured at most
# 7.7e-7 (the cross-grained gradients) over the CPU settings of tests/tolerance.py.
REL = 1e-5


def _close(actual, expected):
    assert_close(actual, expected, REL)


def _leaves(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).requires_grad_() for s in shapes]


def _grads(value, inputs):
    return torch.autograd.grad(value.pow(2).sum(), inputs)  # a non-linear read-out exercises every entry


def test_cross_grained_matches_reference():
    inputs = _leaves((5, 16), (5, 10, 16), (5, 16), (5, 8, 16))
    vectorised = cross_grained_similarity(*inputs, tau=0.07)
    reference = ref.cross_grained(*inputs, tau=0.07)
    assert vectorised.shape == (5, 5)
    _close(vectorised, reference)
    assert_each_close(_grads(vectorised, inputs), _grads(reference, inputs), REL)


def test_fine_grained_matches_reference():
    inputs = _leaves((5, 6, 16), (5, 7, 16), seed=1)
    vectorised = fine_grained_similarity(*inputs, k_word=3, k_patch=3, tau=0.01)
    reference = ref.fine_grained(*inputs, k_word=3, k_patch=3, tau=0.01)
    _close(vectorised, reference)
    assert_each_close(_grads(vectorised, inputs), _grads(reference, inputs), REL)


def test_cross_grained_with_one_token_is_the_scaled_cosine():
    img_g, img_s, txt_g, txt_s = _leaves((3, 4), (3, 1, 4), (3, 4), (3, 1, 4), seed=2)
    unit = lambda x: x / x.norm(dim=-1, keepdim=True)  # noqa: E731
    expected_iw = unit(img_g) @ unit(txt_s[:, 0]).T / 0.07  # softmax over one word is 1
    expected_pt = unit(img_s[:, 0]) @ unit(txt_g).T / 0.07
    _close(cross_grained_similarity(img_g, img_s, txt_g, txt_s), (expected_iw + expected_pt) / 2)


def test_fine_grained_two_samples_by_hand():
    # Sample 0: patch e1 pairs with word e1; sample 1: patch e2 pairs with word e2 (k = 1 makes the top-k a pick).
    patches = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    words = torch.tensor([[[2.0, 0.0]], [[0.0, 3.0]]])
    sim = fine_grained_similarity(patches, words, k_word=1, k_patch=1, tau=0.5)
    # posWord_j = e_(j+1), posPatch_i = e_(i+1): sim[i, j] = (<e_i, e_j> + <e_i, e_j>) / 2 / 0.5
    _close(sim, torch.eye(2) * 2.0)


def test_batch_permutation_equivariance():
    img_g, img_s, txt_g, txt_s = _leaves((6, 8), (6, 5, 8), (6, 8), (6, 7, 8), seed=3)
    p_img, p_txt = torch.randperm(6), torch.randperm(6)
    cross = cross_grained_similarity(img_g, img_s, txt_g, txt_s)
    _close(cross_grained_similarity(img_g[p_img], img_s[p_img], txt_g[p_txt], txt_s[p_txt]), cross[p_img][:, p_txt])
    # FCD pairs image i with caption i before comparing across the batch, so only a joint permutation applies.
    fine = fine_grained_similarity(img_s, txt_s)
    _close(fine_grained_similarity(img_s[p_img], txt_s[p_img]), fine[p_img][:, p_img])


def test_temperature_scales_the_fine_similarity():
    patches, words = _leaves((4, 5, 8), (4, 6, 8), seed=4)
    base = fine_grained_similarity(patches, words, tau=1.0)
    _close(fine_grained_similarity(patches, words, tau=0.01), base / 0.01)
    assert torch.isfinite(base).all()


class _LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel())
        return out


def test_no_batch_by_batch_by_token_by_width_tensor_is_materialised():
    batch, n_img, n_txt, width = 16, 10, 8, 64
    inputs = _leaves((batch, width), (batch, n_img, width), (batch, width), (batch, n_txt, width), seed=5)
    bbnd = batch * batch * min(n_img, n_txt) * width
    for name in ("vectorised", "reference"):
        with _LargestTensor() as probe:
            if name == "vectorised":
                sim = cross_grained_similarity(*inputs) + fine_grained_similarity(inputs[1], inputs[3])
            else:
                sim = ref.cross_grained(*inputs) + ref.fine_grained(inputs[1], inputs[3])
            sim.pow(2).sum().backward()
        if name == "vectorised":
            assert probe.largest < bbnd / 4, probe.largest
        else:
            assert probe.largest >= bbnd  # the probe sees the authors' repeats
