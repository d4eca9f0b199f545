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


# ---------------------------------------------------------------- ablation switches (docs/method.md §5, ablation switches)

ABLATIONS = {  # name: CFineConfig switches and loss weights
    "mgf_off": {"mgf": False},
    "cfr_off": {"cfr": False},
    "fcd_off": {"fcd": False},
    "mgf_off_cfr_off": {"mgf": False, "cfr": False},
    "mgf_off_fcd_off": {"mgf": False, "fcd": False},
    "baseline": {"mgf": False, "cfr": False, "fcd": False,
                 "loss_weights": {"diversity_weight": 0.0, "ranking_weight": 0.0}},
}


def _ablated_head(switches, seed=0, num_classes=6):
    torch.manual_seed(seed)
    config = CFineConfig(clip=CLIPConfig.tiny(width=WIDTH), num_classes=num_classes, **switches)
    head = CFineHead(config).train()
    with torch.no_grad():  # as _head: BN and LayerNorm off their identity initialisation
        for name, param in head.named_parameters():
            if "ln_" in name or "bn" in name:
                param.add_(0.1 * torch.randn_like(param))
    return head


def _ablated_reference(head, image, text, pids):
    """The switches' rule restated on tests/cfine_reference.py's loops: mgf off, features [BN(global)] (B, 1, D), CMPM
    and CMPC of that feature at the first weight, no diversity; S = the sum of the similarities switched on."""
    config = head.config
    # The reference's selections and global tokens depend on the raw tokens alone; an MGF block is only needed
    # for its features, which mgf off replaces.
    block = head.mgf if config.mgf else _head(seed=9).mgf
    img_f, img_g, img_g1, img_sel = ref.modality(image, config.image_ratio, False, block, head.image_bn)
    txt_f, txt_g, txt_g1, txt_sel = ref.modality(text, config.text_ratio, True, block, head.text_bn)
    if not config.mgf:
        img_f = ref.batch_norm(img_g, head.image_bn).unsqueeze(1)
        txt_f = ref.batch_norm(txt_g, head.text_bn).unsqueeze(1)
    similarities = []
    if config.cfr:
        similarities.append(ref.cross_grained(img_g, img_sel, txt_g, txt_sel, config.tau_cs))
    if config.fcd:
        similarities.append(ref.fine_grained(img_g1, txt_g1, config.k_word, config.k_patch, config.tau_cd))
    weight = head.classifier.weight
    n = img_f.shape[1]
    zero = torch.zeros(())
    parts = {
        "cmpm": sum(w * ref.cmpm(img_f[:, i], txt_f[:, i], pids) for i, w in enumerate(config.cmpm_weights[:n])),
        "cmpc": sum(w * ref.cmpc(img_f[:, i], txt_f[:, i], pids, weight) for i, w in enumerate(config.cmpc_weights[:n])),
        "diversity": config.diversity_weight * (ref.diversity(img_f[:, 1:]) + ref.diversity(txt_f[:, 1:]))
        if config.mgf else zero,
        "ranking": config.ranking_weight * ref.ranking(sum(similarities), pids, config.margin)
        if similarities and config.ranking_weight > 0 else zero,
    }
    return {"image_features": img_f, "text_features": txt_f, "loss": sum(parts.values()), **parts}


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_each_ablation_matches_its_rule_on_the_loop_reference(name):
    head = _ablated_head(ABLATIONS[name])
    pids = torch.tensor([0, 1, 2, 3, 3, 4, 5, 5])
    image, text = _with_leaf_tokens(*_inputs())
    out = head(image, text, pids)
    image_r, text_r = _with_leaf_tokens(*_inputs())
    reference = _ablated_reference(head, image_r, text_r, pids)
    assert out.image_features.shape == out.text_features.shape == (8, head.config.num_features, WIDTH)
    _close(out.image_features, reference["image_features"])
    _close(out.text_features, reference["text_features"])
    assert set(out.losses) == set(PARTS)  # the same columns in metrics.jsonl, whatever is switched off
    for part in PARTS:
        assert_close(out.losses[part], reference[part].detach(), REL_LOSS, what=part)
    if head.config.trains_similarity:
        assert reference["ranking"] > 0  # triplets count: the similarity reaches the loss
    params = [p for p in head.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.loss, [image.tokens, text.tokens, *params], allow_unused=True)
    ref_grads = torch.autograd.grad(reference["loss"], [image_r.tokens, text_r.tokens, *params], allow_unused=True)
    grads, ref_grads = ([torch.zeros_like(p) if g is None else g for g, p in zip(gs, [image.tokens, text.tokens, *params])]
                        for gs in (grads, ref_grads))
    assert_each_close(grads, ref_grads, REL_GRAD, floor=1e-1)


def test_mgf_off_has_no_mgf_block_and_gives_the_bn_global_token():
    head = _ablated_head({"mgf": False})
    assert head.mgf is None and not any(key.startswith("mgf.") for key in head.state_dict())
    full = _head()
    assert set(head.state_dict()) == {key for key in full.state_dict() if not key.startswith("mgf.")}
    image, text = _inputs()
    head.eval()  # BN with its running statistics: each sample alone
    global_image = image.tokens[:, 0]
    global_text = text.tokens[torch.arange(8), text.global_index]
    bn_i, bn_t = head.image_bn, head.text_bn
    _close(head.image_features(image), ((global_image - bn_i.running_mean) / (bn_i.running_var + bn_i.eps).sqrt()
                                        * bn_i.weight + bn_i.bias).unsqueeze(1).detach())
    _close(head.text_features(text), ((global_text - bn_t.running_mean) / (bn_t.running_var + bn_t.eps).sqrt()
                                      * bn_t.weight + bn_t.bias).unsqueeze(1).detach())


def _refuse(what):
    def refused(*args, **kwargs):
        raise AssertionError(f"{what} was computed")
    return refused


@pytest.mark.parametrize("switches, training, skipped", [
    ({"mgf": False}, False, ["select_tokens", "local_global_features"]),  # inference: the global token alone
    ({"mgf": False, "loss_weights": {"ranking_weight": 0.0}}, True, ["select_tokens", "local_global_features",
                                                                    "cross_grained_similarity", "fine_grained_similarity"]),
    ({"mgf": False, "cfr": False, "fcd": False, "loss_weights": {"ranking_weight": 0.0}}, True,
     ["select_tokens", "local_global_features", "cross_grained_similarity", "fine_grained_similarity"]),
    ({"cfr": False}, True, ["cross_grained_similarity"]),
    ({"fcd": False}, True, ["fine_grained_similarity"]),
    ({"cfr": False, "fcd": False, "loss_weights": {"ranking_weight": 0.0}}, True,
     ["cross_grained_similarity", "fine_grained_similarity"]),
    ({"loss_weights": {"ranking_weight": 0.0}}, True, ["cross_grained_similarity", "fine_grained_similarity"]),
])
def test_what_is_switched_off_is_not_computed(switches, training, skipped, monkeypatch):
    from models import head as head_module
    from models import objectives

    head = _ablated_head(switches).train(training)
    for name in skipped:
        monkeypatch.setattr(head_module, name, _refuse(name))
    if not head.config.mgf:
        monkeypatch.setattr(objectives, "diversity_loss", _refuse("diversity_loss"))
    out = head(*_inputs(), torch.tensor([0, 1, 2, 3, 3, 4, 5, 5]))
    assert out.image_features.shape == (8, head.config.num_features, WIDTH)
    if training:
        assert torch.isfinite(out.loss)
        assert out.losses["ranking"] == 0 if not head.config.trains_similarity else out.losses["ranking"] > 0
        assert out.losses["diversity"] == 0 if not head.config.mgf else out.losses["diversity"] > 0


def test_mgf_off_still_selects_tokens_for_the_similarity_in_training_only(monkeypatch):
    from models import head as head_module

    head = _ablated_head({"mgf": False})
    calls = []
    real = head_module.select_tokens
    monkeypatch.setattr(head_module, "select_tokens", lambda *a: calls.append(1) or real(*a))
    image, text = _inputs()
    head(image, text, torch.arange(8) % 6)
    assert len(calls) == 2  # image and text, for CFR and FCD
    head.image_features(image), head.text_features(text)  # features alone: the global token
    head.eval()(image, text, torch.arange(8) % 6)
    assert len(calls) == 2
