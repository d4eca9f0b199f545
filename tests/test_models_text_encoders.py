"""The text-encoder interface (models/text_encoders/): a third encoder, added by this test alone, builds, tokenises,
round-trips through a config and trains in the text encoder's optimiser group; the registry is the one choice."""
import zlib

import pytest
import torch
from torch import nn

from clip.model import CLIPConfig, TokenFeatures
from engine.settings import TABLE
from models import CFine, CFineConfig, build_optimizer
from models.text_encoders import TEXT_ENCODERS, BertTextEncoder, ClipTextEncoder, TextEncoder, register, text_encoder_class
from models.tokenization import caption_tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")
VOCAB, LENGTH, HIDDEN = 101, 16, 32
CAPTIONS = ["a man in a red coat", "a man with a red coat and a black bag", "a woman in blue jeans",
            "the woman wearing blue jeans and white shoes", "a boy with a green backpack", "a young boy in green",
            "an old man holding a bag", "an old man carrying a black bag on his back"]
PIDS = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])


class ToyTokenizer:
    """[CLS] = 1, then each word's id (2 .. VOCAB-1, by CRC32), zero padding to LENGTH ids."""

    max_length = LENGTH

    def token_counts(self, captions):
        return [1 + len(caption.split()) for caption in captions]

    def __call__(self, captions):
        out = torch.zeros(len(captions), LENGTH, dtype=torch.long)
        for n, caption in enumerate(captions):
            ids = [1] + [2 + zlib.crc32(word.encode()) % (VOCAB - 2) for word in caption.lower().split()]
            out[n, : min(len(ids), LENGTH)] = torch.tensor(ids[:LENGTH])
        return out


class ToyTextEncoder(TextEncoder):
    """An embedding and a linear layer; [CLS] (position 0) is the global token, its attention row a softmax of the
    tokens' dot products with it, padding where the id is 0."""

    name = "toy"
    attribute = "toy"

    @classmethod
    def tokenizer(cls, options, vocab):
        return ToyTokenizer()

    @classmethod
    def build(cls, config, clip, vocab):
        return nn.Sequential(nn.Embedding(VOCAB, HIDDEN), nn.Linear(HIDDEN, config.width))

    @classmethod
    def encode(cls, module, ids):
        tokens = module(ids)
        padding = ids == 0
        scores = (tokens @ tokens[:, 0].unsqueeze(-1)).squeeze(-1).masked_fill(padding, float("-inf"))
        return TokenFeatures(tokens, scores.softmax(dim=1), torch.zeros(len(ids), dtype=torch.long), padding)


@pytest.fixture
def toy():
    register(ToyTextEncoder)
    yield ToyTextEncoder
    del TEXT_ENCODERS[ToyTextEncoder.name]


def _toy_model(seed=0):
    torch.manual_seed(seed)
    return CFine(CFineConfig(clip=CLIPConfig.tiny().vision_only(), text_encoder="toy", num_classes=4))


def test_a_toy_encoder_trains_one_step_in_the_text_encoders_group(toy):
    model = _toy_model().train()
    assert isinstance(model.tokenizer, ToyTokenizer) and isinstance(caption_tokenizer(model.config), ToyTokenizer)
    ids = model.tokenize(CAPTIONS)
    assert ids.shape == (8, LENGTH) and model.encode_text_tokens(ids).tokens.shape == (8, LENGTH, 64)
    optimizer, _ = build_optimizer(model, lr_text=1e-3, warmup_epochs=0)
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert {id(p) for p in groups["text_encoder"]["params"]} == {id(p) for p in model.toy.parameters()}
    assert groups["text_encoder"]["lr"] == 1e-3
    assert {id(p) for p in groups["image_encoder"]["params"]} == {id(p) for p in model.clip.visual.parameters()}
    before = {name: p.detach().clone() for name, p in model.toy.named_parameters()}
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out = model(images, ids, PIDS)
    assert torch.isfinite(out.loss) and set(out.losses) == {"cmpm", "cmpc", "diversity", "ranking"}
    optimizer.zero_grad()
    out.loss.backward()
    optimizer.step()
    changed = [name for name, p in model.toy.named_parameters() if not torch.equal(p.detach(), before[name])]
    assert changed == list(before)  # the embedding (rows of the words used) and both linear parameters


def test_a_toy_model_round_trips_through_its_config_and_loads_its_weights(toy):
    model, other = _toy_model(seed=0), _toy_model(seed=1)
    keys = model.state_dict().keys()
    assert {"toy.0.weight", "toy.1.weight", "toy.1.bias"} <= keys and not any(k.startswith("text") for k in keys)
    rebuilt = CFine(CFineConfig.from_dict(model.config.to_dict()))
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    other.load_text_weights(model.toy.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(other.toy.parameters(), model.toy.parameters()))
    with pytest.raises(RuntimeError, match="Missing key"):
        other.load_text_weights({})


def test_an_encoder_beside_the_image_tower_alone_refuses_the_whole_clip(toy):
    with pytest.raises(ValueError, match="text_encoder 'toy' uses the image tower alone"):
        CFineConfig(clip=CLIPConfig.tiny(), text_encoder="toy")


def test_the_registry_is_the_one_choice():
    assert text_encoder_class("clip") is ClipTextEncoder and text_encoder_class("bert") is BertTextEncoder
    with pytest.raises(ValueError, match="text_encoder 'gpt' is unknown; use one of 'clip', 'bert'"):
        CFineConfig(clip=CLIPConfig.tiny(), text_encoder="gpt")
    with pytest.raises(ValueError, match="'bert' is taken by BertTextEncoder"):
        register(type("Other", (ToyTextEncoder,), {"name": "bert"}))
    # train.py's table (torch-free, for --help) offers exactly the registered encoders, each with its source flag.
    assert TABLE["text_encoder"].choices == tuple(TEXT_ENCODERS)
    for name, encoder in TEXT_ENCODERS.items():
        if encoder.source_setting:
            assert TABLE[encoder.source_setting].needed_by == ("text_encoder", name)


def test_clip_and_bert_modes_keep_their_state_dict_prefixes():
    model = CFine(CFineConfig(clip=CLIPConfig.tiny(), num_classes=3))
    assert model.text_module is model.clip and "clip.token_embedding.weight" in model.state_dict()
    text = {id(p) for p in model.encoder_parameters()["text_encoder"]}
    assert id(model.clip.token_embedding.weight) in text and id(model.clip.logit_scale) not in text
    assert text.isdisjoint(id(p) for p in model.clip.visual.parameters())
