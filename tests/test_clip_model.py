"""clip/model.py: parity with open_clip's ViT-B-16-quickgelu and the token-level outputs CFine uses."""
import math

import pytest
import torch
import torch.nn.functional as F

from clip import tokenize
from clip.config import CLIPConfig
from clip.loading import build_model
from clip.model import CLIP
from tests.tolerance import assert_close, skip_bf16_attention_if_forced_default

# fp32 roundings in another summation order (ours vs open_clip's modules, fused vs explicit attention), relative
# to the largest entry (tests/tolerance.py). Measured at most, over the CPU settings of tests/tolerance.py: 2.6e-7 on
# the tiny model, 6.0e-7 through ViT-B/16's 12 layers, 9.5e-3 under bf16 autocast (bf16 keeps 8 bits: 2^-8 = 3.9e-3).
REL = 5e-6
REL_VIT_B16 = 1e-5
REL_BF16 = 1e-1

CAPTIONS = [
    "A woman in a red coat with a black backpack.",
    "The man wears a grey t-shirt, blue jeans and white sneakers; he carries a brown bag.",
    "young girl, long black hair, pink dress",
    "A person walking with an umbrella " * 12,  # longer than the context: truncated
]


@pytest.fixture(scope="module")
def openclip_and_ours():
    import open_clip  # test-only dependency (requirements-dev.txt)
    torch.manual_seed(0)
    reference = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None).eval()
    ours = CLIP(CLIPConfig.vit_b16()).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


def test_openclip_state_dict_loads_strictly_and_features_match(openclip_and_ours):
    reference, ours = openclip_and_ours
    images = torch.randn(2, 3, 224, 224)
    ids = tokenize(CAPTIONS)
    with torch.no_grad():
        assert_close(ours.encode_image(images), reference.encode_image(images), REL_VIT_B16, what="image")
        assert_close(ours.encode_text(ids), reference.encode_text(ids), REL_VIT_B16, what="text")


def test_build_model_infers_vit_b16_from_shapes(openclip_and_ours):
    reference, _ = openclip_and_ours
    model = build_model(reference.state_dict())
    assert model.config == CLIPConfig.vit_b16()


def test_token_outputs_agree_with_pooled_features():
    torch.manual_seed(1)
    model = CLIP(CLIPConfig.tiny()).eval()
    images = torch.randn(3, 3, 32, 32)
    ids = tokenize(CAPTIONS[:3])
    with torch.no_grad():
        image = model.encode_image_tokens(images)
        text = model.encode_text_tokens(ids)
        assert image.tokens.shape == (3, 1 + 16, 64)
        assert text.tokens.shape == (3, 77, 64)
        assert_close(image.tokens[:, 0], model.encode_image(images), REL)
        eot = ids.argmax(-1)
        assert torch.equal(text.global_index, eot)
        assert_close(text.tokens[torch.arange(3), eot], model.encode_text(ids), REL)
        assert torch.equal(image.global_index, torch.zeros(3, dtype=torch.long))


def _explicit_last_layer_row(transformer, x, causal, index):
    """Run all but the last block, then compute the last block's full attention matrix by hand."""
    for block in transformer.resblocks[:-1]:
        x, _ = block(x, causal)
    attn = transformer.resblocks[-1].attn
    h = transformer.resblocks[-1].ln_1(x)
    batch, length, width = h.shape
    heads = attn.heads
    q, k, _ = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q = q.view(batch, length, heads, -1).transpose(1, 2)
    k = k.view(batch, length, heads, -1).transpose(1, 2)
    scores = q @ k.transpose(-2, -1) / math.sqrt(width // heads)
    if causal:
        scores = scores.masked_fill(torch.ones(length, length).triu(1).bool(), float("-inf"))
    full = scores.softmax(-1).mean(1)  # (B, N, N)
    return full[torch.arange(batch), index]


def test_attention_row_sums_to_one_and_matches_explicit_attention():
    torch.manual_seed(2)
    model = CLIP(CLIPConfig.tiny()).eval()
    images = torch.randn(2, 3, 32, 32)
    ids = tokenize(CAPTIONS[:2])
    with torch.no_grad():
        image = model.encode_image_tokens(images)
        visual = model.visual
        x = visual.conv1(images).flatten(2).transpose(1, 2)
        x = torch.cat([visual.class_embedding.expand(2, 1, -1), x], 1) + visual.positional_embedding
        expected = _explicit_last_layer_row(visual.transformer, visual.ln_pre(x), False, torch.zeros(2, dtype=torch.long))
        assert_close(image.global_attention, expected, REL)
        assert_close(image.global_attention.sum(-1), torch.ones(2), REL)

        text = model.encode_text_tokens(ids)
        x = model.token_embedding(ids) + model.positional_embedding
        expected = _explicit_last_layer_row(model.transformer, x, True, ids.argmax(-1))
        assert_close(text.global_attention, expected, REL)
        assert_close(text.global_attention.sum(-1), torch.ones(2), REL)
        after_eot = torch.arange(77) > ids.argmax(-1, keepdim=True)
        assert text.global_attention[after_eot].abs().max() == 0


def test_positional_embedding_resize_for_384x128():
    torch.manual_seed(3)
    source = CLIP(CLIPConfig.tiny(image_size=(32, 32)))
    same = build_model(source.state_dict(), image_size=(32, 32))
    torch.testing.assert_close(same.visual.positional_embedding, source.visual.positional_embedding, rtol=0, atol=0)
    tall = build_model(source.state_dict(), image_size=(384, 128))
    assert tall.visual.positional_embedding.shape == (1 + 48 * 16, 64)
    assert torch.equal(tall.visual.positional_embedding[0], source.visual.positional_embedding[0])  # kept, not resized
    with torch.no_grad():
        out = tall.encode_image_tokens(torch.randn(2, 3, 384, 128))
    assert out.tokens.shape == (2, 1 + 48 * 16, 64)
    assert torch.isfinite(out.tokens).all()


def test_wrong_image_size_is_a_clear_error():
    model = CLIP(CLIPConfig.tiny())
    with pytest.raises(ValueError, match="image_size"):
        model.encode_image(torch.randn(1, 3, 64, 32))


@skip_bf16_attention_if_forced_default
def test_autocast_bf16_runs_and_stays_close():
    torch.manual_seed(4)
    model = CLIP(CLIPConfig.tiny()).eval()
    images = torch.randn(2, 3, 32, 32)
    ids = tokenize(CAPTIONS[:2])
    with torch.no_grad():
        full = model.encode_text_tokens(ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model.encode_text_tokens(ids)
            low_image = model.encode_image_tokens(images)
    assert low.global_attention.dtype == torch.float32
    assert torch.isfinite(low_image.tokens.float()).all()
    assert_close(low.tokens.float(), full.tokens, REL_BF16)
    assert_close(low.global_attention, full.global_attention, REL_BF16)


def test_non_square_grid_loads_at_its_own_size_and_refuses_other_sizes():
    from clip.loading import CheckpointError

    torch.manual_seed(5)
    source = CLIP(CLIPConfig.tiny(image_size=(64, 32)))  # an 8 x 4 patch grid
    same = build_model(source.state_dict(), image_size=(64, 32))
    torch.testing.assert_close(same.visual.positional_embedding, source.visual.positional_embedding, rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="not a square grid"):
        build_model(source.state_dict(), image_size=(96, 32))
    with pytest.raises(CheckpointError, match="pass image_size"):
        build_model(source.state_dict())
