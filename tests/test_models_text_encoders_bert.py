"""The authors' configuration (docs/method.md §9): BERT tokenisation, BERT token features, the §9 text path, bert-mode CFine."""
import json
import sys

import pytest
import torch
import transformers  # requirements-bert.txt, installed by run_tests.sh through requirements-dev.txt

from clip.model import CLIP, CLIPConfig
from models import CFine, CFineConfig, CFineHead
from models.optim import parameter_groups
from models.text_encoders.bert import (
    BertFolderError,
    BertTextEncoder,
    architecture,
    check_bert_folder,
    load_pretrained_bert,
    read_vocabulary,
)
from models.text_encoders.bert_tokenizer import BertCaptionTokenizer, authors_string, bert_tokenize
from tests import cfine_reference as ref
from tests.bert_fixtures import copy_bert_folder, tiny_bert_config, tiny_vocab, write_bert_folder, write_vocab
from tests.tolerance import assert_close, relative_error

pytestmark = pytest.mark.usefixtures("single_thread")
# fp32 roundings in another summation order, relative to the largest entry (tests/tolerance.py). Measured at most,
# over the CPU settings of tests/tolerance.py: 1.2e-7 against transformers' BertModel and CLIP's own path; 6.0e-7
# against the loop reference; 5.1e-6 for its losses (the ranking loss sums margin - s_pos + s_neg over triplets, so
# similarities of order 1/tau cancel to a loss of their own order).
REL_DIRECT = 2e-6
REL = 1e-5
REL_LOSS = 1e-4

SEP, CLS = 4, 3  # ids in tests/bert_fixtures.tiny_vocab()
ADVERSARIAL = [
    "A man in a red coat.", "", "   ", "Café résumé naïve ÉLAN", "a woman [SEP] with [CLS] bag [UNK] [MASK]",
    "x" * 300, " ".join(["the man wearing blue jeans"] * 40), "中文 text — ’quotes’ …emoji😀",
    "tab\there\nnewline", "&amp; html &lt;b&gt;", "under_score hy-phen 3.5cm", "ünïcödé ßtraße",
    "\u200bzero width\u200b", "control\x07char", "Mixed CASE [cls] [sep]", "a\u00a0nbsp  double  space\n",
    "Ａ fullwidth", "i'm can't", "man " * 97 + "coat", "man " * 98 + "coat",
]


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    return write_bert_folder(tmp_path_factory.mktemp("bert") / "bert-tiny")


def slow_reference_tokenizer(vocab_file):
    """transformers' pure-Python WordPiece tokenizer (BertTokenizerLegacy in 5.x, BertTokenizer in 4.x)."""
    slow = getattr(transformers, "BertTokenizerLegacy", None) or transformers.BertTokenizer
    return slow(str(vocab_file), do_lower_case=True)


def test_bert_tokenize_is_the_authors_rule_on_the_slow_tokenizer(tmp_path):
    vocab = write_vocab(tmp_path / "vocab.txt")
    slow = slow_reference_tokenizer(vocab)
    ours = bert_tokenize(ADVERSARIAL, vocab)
    assert ours.shape == (len(ADVERSARIAL), 100) and ours.dtype == torch.long
    for row, caption in zip(ours.tolist(), ADVERSARIAL):
        ids = slow.convert_tokens_to_ids(slow.tokenize(authors_string(caption)))[:100]  # the authors, one by one
        assert row == ids + [0] * (100 - len(ids)), caption
    # The quirk is real: a caption of 99 word pieces loses its [SEP]; a short one keeps it, then [PAD]s.
    long_row, short_row = ours[ADVERSARIAL.index("man " * 98 + "coat")], ours[0]
    assert long_row[0] == CLS and SEP not in long_row.tolist() and long_row[-1] != 0
    assert short_row[0] == CLS and SEP in short_row.tolist() and short_row[-1] == 0
    fits = ours[ADVERSARIAL.index("man " * 97 + "coat")]
    assert fits[-1] == SEP  # exactly 100 ids: [SEP] is the last one kept


def test_bert_folder_errors_name_what_is_missing(tmp_path, bert_folder, monkeypatch):
    with pytest.raises(BertFolderError, match="no such folder.*bert-base-uncased"):
        check_bert_folder(tmp_path / "absent")
    partial = tmp_path / "partial"
    partial.mkdir()
    write_vocab(partial / "vocab.txt")
    with pytest.raises(BertFolderError, match="missing config.json, model.safetensors or pytorch_model.bin"):
        check_bert_folder(partial)
    # A weights file of another model: transformers would initialise BERT at random; we refuse.
    foreign = tmp_path / "foreign"
    write_bert_folder(foreign)
    from safetensors.torch import save_file

    save_file({"something.else": torch.zeros(2)}, str(foreign / "model.safetensors"))
    with pytest.raises(BertFolderError, match="lacks or misshapes BERT weights"):
        load_pretrained_bert(foreign)
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    with pytest.raises(BertFolderError, match="pip install -r requirements-bert.txt"):
        load_pretrained_bert(bert_folder)


def _edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _write_tokens(path, tokens):
    path.write_text("".join(token + "\n" for token in tokens), encoding="utf-8")


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


FIVE_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# What a --bert folder can get wrong, and what the one-line error must say. Without the checks: specials missing
# trained silently with "a" as padding id 0; a vocabulary past vocab_size failed in the first step (IndexError); a
# 1-layer config over 2-layer weights silently dropped a layer; the others were tracebacks.
BROKEN_FOLDERS = {
    "vocab.txt without the special tokens": (
        lambda d: _write_tokens(d / "vocab.txt", [t for t in tiny_vocab() if t not in FIVE_SPECIALS]),
        r"vocab\.txt lacks BERT's special tokens \[PAD\], \[UNK\], \[CLS\], \[SEP\], \[MASK\]"),
    "vocab.txt with [PAD] not first": (
        lambda d: _write_tokens(d / "vocab.txt", tiny_vocab()[1:] + ["[PAD]"]),
        r"vocab\.txt has \[PAD\] on line 211, not on line 1 \(id 0 is padding\)"),
    "empty vocab.txt": (lambda d: (d / "vocab.txt").write_text(""), r"vocab\.txt is empty"),
    "vocab.txt longer than vocab_size": (
        lambda d: _write_tokens(d / "vocab.txt", tiny_vocab() + [f"extra{i}" for i in range(50)]),
        r"vocab\.txt has 261 tokens but config\.json's vocab_size is 211"),
    "config.json with fewer layers than the weights": (
        lambda d: _edit_json(d / "config.json", lambda c: c.update(num_hidden_layers=1)),
        r"model\.safetensors holds 2 layer\(s\) but config\.json's num_hidden_layers is 1"),
    "config.json a JSON list": (lambda d: (d / "config.json").write_text("[1, 2]"),
                                r"config\.json is a JSON list, not an object"),
    "config.json not JSON": (lambda d: (d / "config.json").write_text("{"), r"config\.json is not valid JSON"),
    "config.json with a string vocab_size": (
        lambda d: _edit_json(d / "config.json", lambda c: c.update(vocab_size="211")),
        r"config\.json's vocab_size is '211', not a positive integer"),
    "truncated model.safetensors": (lambda d: _truncate(d / "model.safetensors"),
                                    r"model\.safetensors is damaged or truncated"),
    "model.safetensors of a few bytes": (lambda d: (d / "model.safetensors").write_bytes(b"\x05\x00"),
                                         r"model\.safetensors is damaged or truncated"),
    "tokenizer_config.json not an object": (lambda d: (d / "tokenizer_config.json").write_text("[true]"),
                                            r"tokenizer_config\.json is a JSON list, not an object"),
    "tokenizer_config.json with a string do_lower_case": (
        lambda d: (d / "tokenizer_config.json").write_text('{"do_lower_case": "false"}'),
        r"tokenizer_config\.json's do_lower_case is 'false', not true or false"),
}


@pytest.mark.parametrize("case", list(BROKEN_FOLDERS))
def test_a_broken_bert_folder_is_one_line_naming_the_file(tmp_path, bert_folder, case):
    folder = copy_bert_folder(bert_folder, tmp_path / "bert")
    damage, message = BROKEN_FOLDERS[case]
    damage(folder)
    with pytest.raises(BertFolderError, match=message) as error:
        BertTextEncoder.load_source(str(folder))  # what train.py does with --bert
    assert "\n" not in str(error.value) and str(folder) in str(error.value)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy pickle"])
def test_a_truncated_pytorch_model_bin_names_the_file(tmp_path, zip_format):
    folder = write_bert_folder(tmp_path / "bert", safetensors=False)
    assert not (folder / "model.safetensors").exists()
    if not zip_format:  # the format of releases saved before torch 1.6
        weights = torch.load(folder / "pytorch_model.bin")
        torch.save(weights, folder / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    assert load_pretrained_bert(folder)[0] is not None  # whole, it loads
    _truncate(folder / "pytorch_model.bin")
    with pytest.raises(BertFolderError, match=r"pytorch_model\.bin .*damaged or truncated") as error:
        load_pretrained_bert(folder)
    assert "\n" not in str(error.value)


def test_vocabulary_checks_also_guard_reading_the_vocabulary_alone_and_the_tokenizer(tmp_path, bert_folder):
    folder = copy_bert_folder(bert_folder, tmp_path / "bert")
    _write_tokens(folder / "vocab.txt", [t for t in tiny_vocab() if t != "[SEP]"])
    with pytest.raises(BertFolderError, match=r"vocab\.txt lacks BERT's special token \[SEP\]"):
        read_vocabulary(folder)
    for text in ("", "a\nman\n"):  # e.g. a checkpoint's vocabulary from before these checks
        with pytest.raises(BertFolderError, match="the BERT vocabulary"):
            BertCaptionTokenizer(text)


def test_an_architecture_that_cannot_take_the_ids_is_refused_before_the_first_step():
    """Both used to be an IndexError in the first training step: fewer positions than the 100 ids per caption, and
    (a checkpoint's vocabulary, say) more tokens than vocab_size."""
    clip = CLIPConfig.tiny((64, 32)).vision_only()
    with pytest.raises(ValueError, match="max_position_embeddings 64, fewer than the 100 ids per caption"):
        CFineConfig(clip=clip, text_encoder="bert",
                    bert=architecture(tiny_bert_config().to_dict()) | {"max_position_embeddings": 64})
    config = CFineConfig(clip=clip, text_encoder="bert", bert=architecture(tiny_bert_config().to_dict()))
    vocab = "".join(token + "\n" for token in tiny_vocab() + ["extra"])
    with pytest.raises(BertFolderError, match="vocabulary has 212 tokens but the BERT architecture's vocab_size is 211"):
        CFine(config, text_vocab=vocab)


def test_the_public_release_layout_loads_exactly(tmp_path):
    """bert-base-uncased's pytorch_model.bin: BertForPreTraining keys ('bert.' prefix, 'cls.' heads, pooler) with the
    original LayerNorm gamma/beta names. Every encoder weight must arrive unchanged."""
    torch.manual_seed(1)
    config = tiny_bert_config()
    release = transformers.BertForPreTraining(config).state_dict()
    renamed = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in release.items()}
    assert any(k.startswith("cls.") for k in renamed) and any(k.endswith(".gamma") for k in renamed)
    folder = tmp_path / "bert-base-uncased"
    folder.mkdir()
    torch.save(renamed, folder / "pytorch_model.bin")
    config.save_pretrained(folder)
    write_vocab(folder / "vocab.txt")
    model, arch = load_pretrained_bert(folder)
    loaded = model.state_dict()
    assert loaded and all(torch.equal(value, release["bert." + key]) for key, value in loaded.items())
    assert arch["hidden_size"] == 64 and arch["attention_probs_dropout_prob"] == 0.1


def _bert_cfine(folder, num_classes=6, seed=0):
    """CFine in bert mode on the tiny CLIP image tower (width 64) and the folder's BERT weights."""
    torch.manual_seed(seed)
    weights, arch = load_pretrained_bert(folder)
    config = CFineConfig(clip=CLIPConfig.tiny((64, 32)).vision_only(), text_encoder="bert", bert=arch,
                         num_classes=num_classes)
    model = CFine(config, text_vocab=(folder / "vocab.txt").read_text())
    model.bert.load_state_dict(weights.state_dict())
    return model


def _reference_bert(folder):
    return transformers.BertModel.from_pretrained(str(folder), add_pooling_layer=False, attn_implementation="eager",
                                                  local_files_only=True)


def test_bert_tokens_and_attention_row_equal_a_direct_bertmodel_call(bert_folder):
    model, direct = _bert_cfine(bert_folder).eval(), _reference_bert(bert_folder).eval()
    ids = model.tokenize(["a man in a red coat", "a woman with long dark hair and a black backpack", ""])
    ours = model.encode_text_tokens(ids)
    with torch.no_grad():
        out = direct(input_ids=ids, attention_mask=(ids != 0).long(), output_attentions=True)
    assert_close(ours.tokens, out.last_hidden_state, REL_DIRECT)
    assert_close(ours.global_attention, out.attentions[-1][:, :, 0].mean(dim=1), REL_DIRECT)
    assert ours.tokens.shape == (3, 100, 64) and ours.global_index.tolist() == [0, 0, 0]
    assert torch.equal(ours.padding_mask, ids == 0)
    assert_close(ours.global_attention.sum(dim=1), torch.ones(3), REL_DIRECT)  # eval: a true distribution
    assert ours.global_attention[ids == 0].abs().max() < 1e-6  # [PAD] gets ~0 from the additive mask (rows sum to 1)


def test_training_mode_selects_with_the_dropped_out_attention_row(bert_folder):
    model, direct = _bert_cfine(bert_folder), _reference_bert(bert_folder)
    ids = model.tokenize(["a man in a red coat with a black backpack and blue jeans walking"] * 4)
    model.train(), direct.train()
    torch.manual_seed(7)
    ours = model.encode_text_tokens(ids)
    torch.manual_seed(7)
    out = direct(input_ids=ids, attention_mask=(ids != 0).long(), output_attentions=True)
    assert_close(ours.global_attention, out.attentions[-1][:, :, 0].mean(dim=1), REL_DIRECT)
    # Dropout acted: identical captions got different rows, and rows no longer sum to 1.
    assert relative_error(ours.global_attention[0], ours.global_attention[1]) > 1e-2
    assert (ours.global_attention.sum(dim=1) - 1).abs().max() > 1e-3
    # The head selects by that row: its group 1 equals the loop reference's picks from the same row.
    head = model.head
    branch = head._branch(ours, head.text_bn, is_text=True)
    k = int(100 * model.config.text_ratio)
    assert k == 20
    for b in range(4):
        # docs/method.md §9: every position is a candidate, [CLS]'s score multiplied by 0 (not removed).
        scores = ours.global_attention[b].clone()
        scores[0] = 0.0
        _, _, chosen, ranked = ref.select(ours.tokens[b], scores, k, list(range(100)))
        torch.testing.assert_close(branch.selection.selected[b], chosen, rtol=0, atol=0)
        # This caption has fewer than 2k = 40 tokens with a positive score, so the zero-score ties fill the rest:
        # [CLS] first among them (ties by position), right after the last positive-score token.
        positive = int((ours.global_attention[b, 1:] > 0).sum())
        assert positive < 2 * k and ranked.index(0) == positive


def test_bert_text_path_equals_the_loop_reference():
    """docs/method.md §9 text path (100 tokens, k=20, [PAD]s as candidates, key padding mask) vs the loop reference, fp32."""
    torch.manual_seed(0)
    width = 64
    config = CFineConfig(clip=CLIPConfig.tiny(width=width).vision_only(), text_encoder="bert",
                         bert=architecture(tiny_bert_config(hidden=width).to_dict()), num_classes=6)
    head = CFineHead(config).train()
    with torch.no_grad():
        for name, param in head.named_parameters():
            if "ln_" in name or "bn" in name:
                param.add_(0.1 * torch.randn_like(param))
    g = torch.Generator().manual_seed(1)
    real = torch.tensor([3, 12, 40, 100, 25, 7, 60, 18])  # 3 and 7 real ids: fewer than 2k, so [PAD]s get picked
    image = ref.near_duplicate_pairs(ref.random_image_tokens(8, 50, width, g), 0.3, g)
    text = ref.near_duplicate_pairs(ref.random_bert_tokens(8, 100, width, real, g), 0.3, g)
    pids = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1])
    img = image._replace(tokens=image.tokens.clone().requires_grad_())
    txt = text._replace(tokens=text.tokens.clone().requires_grad_())
    out = head(img, txt, pids)
    out.loss.backward()
    grads = img.tokens.grad.clone(), txt.tokens.grad.clone()
    img.tokens.grad, txt.tokens.grad = None, None
    expected = ref.head_losses(head, img, txt, pids)
    expected["loss"].backward()
    assert_close(out.text_features, expected["text_features"], REL)
    assert_close(out.image_features, expected["image_features"], REL)
    for part in ("cmpm", "cmpc", "diversity", "ranking"):
        assert_close(out.losses[part], expected[part].detach(), REL_LOSS, what=part)
    assert_close(grads[0], img.tokens.grad, REL)
    assert_close(grads[1], txt.tokens.grad, REL)
    assert expected["ranking"] > 0  # triplets counted, so the ranking path was exercised


def test_bert_mode_image_tokens_are_clip_tokens_without_the_projection(bert_folder):
    torch.manual_seed(3)
    full = CLIP(CLIPConfig.tiny((64, 32))).eval()
    model = _bert_cfine(bert_folder).eval()
    model.load_clip_weights(full.state_dict())  # the text tower's and visual.proj's weights are not used
    assert "clip.visual.proj" not in model.state_dict() and not any(k.startswith("clip.token_embedding")
                                                                  for k in model.state_dict())
    images = torch.randn(2, 3, 64, 32)
    ours, projected = model.encode_image_tokens(images), full.encode_image_tokens(images)
    assert ours.tokens.shape[-1] == 64
    assert_close(ours.tokens @ full.visual.proj, projected.tokens, REL_DIRECT)
    assert_close(ours.global_attention, projected.global_attention, REL_DIRECT)


def test_bert_mode_optimiser_groups_and_widths(bert_folder):
    model = _bert_cfine(bert_folder)
    groups = {g["name"]: g for g in parameter_groups(model, lr_text=1e-5)}
    text_params = {id(p) for p in groups["text_encoder"]["params"]}
    assert text_params == {id(p) for p in model.bert.parameters()}
    assert groups["text_encoder"]["lr"] == 1e-5 and groups["text_encoder"]["weight_decay"] == 0.0
    assert model.head.classifier.weight.shape[0] == 64 and model.head.text_bn.num_features == 64
    assert model.config.width == 64


def test_incoherent_combinations_are_refused():
    with pytest.raises(ValueError, match="no text partner"):
        CFineConfig(clip=CLIPConfig.tiny().vision_only(), text_encoder="clip")
    with pytest.raises(ValueError, match="hidden size 32 must equal"):
        CFineConfig(clip=CLIPConfig.tiny(width=64).vision_only(), text_encoder="bert",
                    bert=architecture(tiny_bert_config(hidden=32).to_dict()))
    with pytest.raises(ValueError, match="image tower alone"):
        CFineConfig(clip=CLIPConfig.tiny(width=64), text_encoder="bert",
                    bert=architecture(tiny_bert_config(hidden=64).to_dict()))


def test_bert_config_round_trips_through_a_dict(bert_folder):
    model = _bert_cfine(bert_folder)
    again = CFine(CFineConfig.from_dict(model.config.to_dict()), text_vocab=model.text_vocab)
    again.load_state_dict(model.state_dict(), strict=True)
    ids = model.tokenize(["a girl in a green jacket"])
    assert torch.equal(ids, again.tokenize(["a girl in a green jacket"]))
    model.eval(), again.eval()
    assert_close(again.encode_texts(ids), model.encode_texts(ids), REL_DIRECT)


def test_overlong_captions_warn_when_asked(bert_folder):
    model = _bert_cfine(bert_folder)
    with pytest.warns(UserWarning, match="1 caption\\(s\\) exceed the text encoder's 100 tokens"):
        model.tokenize(["short one", "word " * 120], warn_truncated=True)
