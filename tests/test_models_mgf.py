"""MGF modules (docs/method.md §2): the shared cross-attention block, the BN bottleneck and the CMPC classifier."""
import torch

from models.bottleneck import apply_bottleneck, make_bottleneck
from models.classifier import CMPCClassifier
from models.mgf import ResidualCrossAttentionBlock, local_global_features, mgf_heads
from models.selection import text_padding_mask
from tests import cfine_reference as ref
from tests.tolerance import assert_close, assert_each_close, relative_error

# fp32 roundings in another summation order, relative to the largest entry (tests/tolerance.py); measured at most
# 5.2e-7 (the block's gradients) over the CPU settings of tests/tolerance.py.
REL = 1e-5


def _close(actual, expected):
    assert_close(actual, expected, REL)


def _block(width=32, heads=2, seed=0):
    torch.manual_seed(seed)
    block = ResidualCrossAttentionBlock(width, heads)
    with torch.no_grad():  # non-trivial norms and biases, so the reference checks every term
        for name, param in block.named_parameters():
            if "ln_" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    return block


def test_block_first_position_matches_the_full_spec_block_per_sample_with_key_padding():
    block = _block()
    x = torch.randn(3, 6, 32, requires_grad=True)
    memory = torch.randn(3, 20, 32, requires_grad=True)
    eot = torch.tensor([4, 19, 10])
    mask = text_padding_mask(eot, 20)
    out = block(x, memory, mask)
    expected = torch.stack([ref.block(x[b], memory[b], block, set(range(int(eot[b]) + 1, 20)))[0] for b in range(3)])
    assert out.shape == (3, 32)
    _close(out, expected)
    params = list(block.parameters())
    grads = torch.autograd.grad(out.pow(2).sum(), [x, memory, *params])
    ref_grads = torch.autograd.grad(expected.pow(2).sum(), [x, memory, *params])
    assert_each_close(grads, ref_grads, REL, floor=1e-3)


def test_masked_keys_do_not_influence_the_output():
    block = _block(seed=1)
    x, memory = torch.randn(2, 4, 32), torch.randn(2, 12, 32)
    mask = text_padding_mask(torch.tensor([5, 8]), 12)
    changed = memory.masked_fill(mask.unsqueeze(-1), 100.0)
    _close(block(x, changed, mask), block(x, memory, mask))
    assert relative_error(block(x, changed), block(x, memory)) > 1e-2  # without the mask they would


def test_local_global_features_run_both_groups_through_one_shared_block():
    block = _block(seed=2)
    global_token = torch.randn(4, 32)
    group1, group2, tokens = torch.randn(4, 3, 32), torch.randn(4, 3, 32), torch.randn(4, 9, 32)
    out = local_global_features(block, global_token, (group1, group2), tokens)
    assert out.shape == (4, 2, 32)
    for slot, group in enumerate((group1, group2)):
        _close(out[:, slot], block(torch.cat([global_token.unsqueeze(1), group], 1), tokens))
    assert mgf_heads(512) == 8 and mgf_heads(64) == 1 and mgf_heads(32) == 1


def test_bottleneck_is_one_frozen_bias_bn_with_separate_statistics_per_feature():
    bn = make_bottleneck(8)
    assert not bn.bias.requires_grad and bn.weight.requires_grad
    assert torch.equal(bn.weight.detach(), torch.ones(8)) and torch.equal(bn.bias, torch.zeros(8))
    features = torch.randn(10, 3, 8) * torch.tensor([1.0, 5.0, 0.2]).view(1, 3, 1) + 3
    out = apply_bottleneck(bn, features)
    for i in range(3):  # each feature is standardised with its own batch statistics
        f = features[:, i]
        _close(out[:, i], (f - f.mean(0)) / torch.sqrt(f.var(0, unbiased=False) + bn.eps))
    assert bn.num_batches_tracked == 3  # three calls update the running averages three times, in order
    running = torch.zeros(8)
    for i in range(3):
        running = 0.9 * running + 0.1 * features[:, i].mean(0)
    _close(bn.running_mean, running)


def test_classifier_shape_and_xavier_uniform_bound():
    classifier = CMPCClassifier(512, 1000)
    bound = (6 / (512 + 1000)) ** 0.5
    assert classifier.weight.shape == (512, 1000)
    assert classifier.weight.abs().max() <= bound and classifier.weight.abs().max() > 0.9 * bound
