"""clip.tokenizer: id-for-id parity with open_clip's CLIP tokenizer, truncation, errors, decode, shapes."""
import random

import open_clip
import pytest
import torch

from clip.tokenizer import Tokenizer, decode, default_tokenizer, tokenize

# Fixed by OpenAI CLIP's vocabulary (the clip/ contract), not read from the code under test.
SOT, EOT, VOCAB = 49406, 49407, 49408

SUBJECTS = ["A woman", "The man", "a young girl", "An elderly MAN", "This pedestrian", "Zoë", "the boy", "A person"]
CLOTHES = ["a white t-shirt", "blue jeans", "a black down jacket", "a knee-length skirt", "red sneakers",
           "a naïve-looking beret", "a café-au-lait coat", "grey sweatpants", "a jalapeño-green hoodie"]
ACTIONS = ["is walking", "is carrying a backpack", "holds an umbrella", "rides a bicycle", "is talking on the phone",
           "looks down at her phone", "walks with a dog", "stands near the gate"]
DECOR = ["“quoted”", "‘single’", "it's", "she'll", "they're", "—", "–", "...", "…", "&amp;", "&#39;", "&quot;hi&quot;",
         "&lt;b&gt;", "&amp;amp;", "&nbsp;", "😀", "👜", "👩‍🦰", "🧥🧢", "1.75m", "3/4", "25-year-old", "No.7",
         "100%", "$20", "ﬁne", "ＡＢＣ", "cafÃ©", "Straße", "naïve", "ÉCOLE", "中文 红色", "Привет", "¿qué?",
         "<|endoftext|>", "\t", "  ", "\u00a0", "\u200b", "x²", "½", "#tag", "@user", "(left)", "[bag]"]


def make_captions(count: int, seed: int = 0) -> list[str]:
    """Pedestrian-style captions with unicode punctuation, HTML entities, emoji, odd whitespace and long tails."""
    rng = random.Random(seed)
    captions = ["", " ", "\n", "&amp;", "😀", "A MAN.\n", "a  woman\t in   red \r\n"]
    while len(captions) < count:
        sentences = []
        for _ in range(rng.choice([1, 1, 2, 3, 8])):  # 8 sentences -> well over 77 tokens
            words = [rng.choice(SUBJECTS), rng.choice(["wearing", "in", "with"]), rng.choice(CLOTHES),
                     rng.choice(["and", "&amp;", ",", "—"]), rng.choice(CLOTHES), rng.choice(ACTIONS)]
            for _ in range(rng.randint(0, 3)):
                words.insert(rng.randint(0, len(words)), rng.choice(DECOR))
            sentences.append(rng.choice([" ", "  "]).join(words) + rng.choice([".", "!", "", " .", "。"]))
        captions.append(" ".join(sentences) + rng.choice(["", "", "\n", "  ", " \n\n"]))
    return captions


@pytest.fixture(scope="module")
def reference():
    return open_clip.get_tokenizer("ViT-B-16-quickgelu")


@pytest.fixture(scope="module")
def captions():
    return make_captions(240)


def test_ids_match_open_clip(reference, captions):
    ours = tokenize(captions)
    theirs = reference(captions)
    assert ours.shape == theirs.shape == (len(captions), 77)
    assert torch.equal(ours, theirs)


def test_untruncated_encode_matches_open_clip(reference, captions):
    lengths = []
    for caption in captions:
        expected = reference.encode(caption)
        assert default_tokenizer().encode(caption) == expected, repr(caption)
        lengths.append(len(expected))
    # The generated set must exercise both empty and over-long captions for the parity tests to mean anything.
    assert min(lengths) == 0 and sum(n + 2 > 77 for n in lengths) >= 10


def test_truncation_keeps_eot_last(reference):
    long_caption = " ".join(make_captions(60, seed=1))
    bpe = reference.encode(long_caption)
    assert len(bpe) > 200
    row = tokenize(long_caption)[0]
    assert row[0] == SOT and row[-1] == EOT
    assert row[1:-1].tolist() == bpe[:75]
    assert (row == EOT).sum() == 1 and int(row.argmax()) == 76


def test_truncate_false_raises_with_index_and_count(reference):
    long_caption = "a man in a red coat and blue jeans " * 12
    count = len(reference.encode(long_caption)) + 2
    with pytest.raises(ValueError, match=rf"caption 1 has {count} tokens"):
        tokenize(["a short caption", long_caption], truncate=False)
    fits = tokenize(["a short caption"], truncate=False)
    assert torch.equal(fits, tokenize(["a short caption"]))


def test_decode_round_trip_and_parity(reference, captions):
    text = "a woman in a white shirt and blue jeans is walking towards the camera"
    ids = default_tokenizer().encode(text)
    # CLIP turns each end-of-word marker into a space, hence the one trailing space.
    assert decode(ids) == text + " "
    for caption in captions[:50]:
        caption_ids = reference.encode(caption)
        assert decode(caption_ids) == reference.decode(caption_ids)
    assert decode([SOT, EOT]) == "<|startoftext|><|endoftext|>"


def test_shapes_dtype_padding():
    single = tokenize("a man in red")
    assert single.shape == (1, 77) and single.dtype == torch.long
    batch = tokenize(["a man", "a woman with a bag", ""], context_length=12)
    assert batch.shape == (3, 12)
    eot_at = batch.argmax(dim=1)
    for row, end in zip(batch, eot_at.tolist()):
        assert row[0] == SOT and row[end] == EOT and (row == EOT).sum() == 1
        assert (row[end + 1 :] == 0).all() and (row[1:end] != 0).all()
    assert eot_at[2] == 1  # the empty caption is just SOT, EOT
    assert tokenize([]).shape == (0, 77)


def test_vocabulary_and_literal_specials():
    tokenizer = default_tokenizer()
    assert (tokenizer.sot_token, tokenizer.eot_token, tokenizer.vocab_size) == (SOT, EOT, VOCAB)
    row = tokenize("a man <|endoftext|> <|startoftext|> in red")[0]
    assert (row == EOT).sum() == 1 and (row == SOT).sum() == 1 and int(row.argmax()) == int((row != 0).sum()) - 1


def test_boundary_errors(tmp_path):
    missing = tmp_path / "missing_vocab.txt.gz"
    with pytest.raises(FileNotFoundError, match="missing_vocab.txt.gz"):
        Tokenizer(str(missing))
    with pytest.raises(TypeError, match="caption 1 is a NoneType"):
        tokenize(["fine", None])
