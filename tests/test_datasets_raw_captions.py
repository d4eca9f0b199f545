"""bert mode reads each caption as the annotation file holds it (docs/method.md §9), clip mode data.sh's cleaned text;
an output of the previous data.sh (cleaned captions alone) is refused in bert mode and still read in clip mode."""
import json

import pytest
import torch

import train
from datasets import BENCHMARKS, prepare
from datasets.base import DataError
from datasets.build import build_eval_data, build_train_loader
from datasets.processed import check_same_data, data_identity, load_split
from models.tokenization import clip_token_ids
from tests.conftest import TINY_TRAIN_FLAGS
from tests.messy_data import make_dataset, make_messy_copy, read_annotation
from utils.errors import CFineError

transformers = pytest.importorskip("transformers")  # requirements-bert.txt

from models.text_encoders.bert_tokenizer import BertCaptionTokenizer  # noqa: E402 (needs transformers)
from tests.bert_fixtures import tiny_vocab, write_bert_folder  # noqa: E402
from tests.test_models_text_encoders_bert import slow_reference_tokenizer  # noqa: E402

NAMES = list(BENCHMARKS)
SIZE = (32, 16)


def prepare_into(raw_root, name, out):
    """data.sh's module on raw_root/<name>, writing out/<name>."""
    assert prepare.main([str(raw_root), name, "--out", str(out), "--workers", "1"]) == 0
    return out / name


def older_record(record):
    """A split file's record as data.sh wrote it before raw captions were kept: cleaned captions alone."""
    return {"pid": record.pid, "image": record.image, "captions": list(record.captions)}


def prepare_as_older_data_sh(raw_root, name, out):
    """out/<name> exactly as the previous data.sh (format 1) wrote it from raw_root/<name>."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(prepare, "FORMAT_VERSION", 1)
        patch.setattr(prepare, "processed_record", older_record)
        return prepare_into(raw_root, name, out)


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    """Per benchmark: its messy raw copy (tests/messy_data.py) and data.sh's output of it, new and old format."""
    base = tmp_path_factory.mktemp("raw_captions")
    found = {}
    for name in NAMES:
        clean = make_dataset(base / "clean", name, ids=24, images_per_id=3, seed=1)
        mess = make_messy_copy(clean, base / "raw" / name, bad_images=False)
        found[name] = (mess, prepare_into(base / "raw", name, base / "new"),
                       prepare_as_older_data_sh(base / "raw", name, base / "old"))
    return found


@pytest.fixture(scope="module")
def bert_tokenizer():
    return BertCaptionTokenizer("\n".join(tiny_vocab()) + "\n")


@pytest.fixture(scope="module")
def slow(tmp_path_factory):
    """transformers' Python WordPiece tokenizer on the same vocabulary: the authors' tokeniser, one caption at a time."""
    vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    vocab.write_text("\n".join(tiny_vocab()) + "\n", encoding="utf-8")
    return slow_reference_tokenizer(vocab)


class Recording:
    """A caption tokeniser that records the strings it is given, then hands them to `inner`."""

    def __init__(self, inner):
        self.inner, self.seen = inner, []
        self.raw_captions, self.max_length = inner.raw_captions, inner.max_length

    def token_counts(self, captions):
        return self.inner.token_counts(captions)

    def __call__(self, captions):
        self.seen.append(list(captions))
        return self.inner(captions)


def authors_ids(slow, caption, length=100):
    """The authors' ids of a caption string: "[CLS] " + caption + " [SEP]", WordPiece, first 100, zero-padded."""
    ids = slow.convert_tokens_to_ids(slow.tokenize("[CLS] " + caption + " [SEP]"))[:length]
    return ids + [0] * (length - len(ids))


def annotation_captions(mess, split, processed_records):
    """The raw file's string of every caption of a processed split, in its order (blank captions are dropped)."""
    _, raw = read_annotation(mess.dataset_dir)
    by_image = {r[mess.image_key]: r["captions"] for r in raw if r["split"] == split}
    return [c for r in processed_records for c in by_image[r["image"]] if c.strip()]


@pytest.mark.parametrize("name", NAMES)
def test_bert_tokenises_the_annotations_own_caption_strings(messy, bert_tokenizer, slow, name):
    mess, new, _ = messy[name]
    _, raw = read_annotation(mess.dataset_dir)
    train_caption = raw[mess.html_record]["captions"][0]
    test_caption = raw[mess.html_test_record]["captions"][0]
    for caption in (train_caption, test_caption):  # what the test is about, in the file itself
        assert "&amp;" in caption and "  " in caption and "\n" in caption and "\t" in caption

    tokenizer = Recording(bert_tokenizer)
    loader = build_train_loader(new, image_size=SIZE, batch_size=4, workers=0, tokenizer=tokenizer)
    expected = annotation_captions(mess, "train", load_split(new, "train").records)
    assert train_caption in expected and tokenizer.seen[-1] == expected  # the file's strings, character for character
    assert loader.dataset.tokens.tolist() == [authors_ids(slow, c) for c in expected]

    data = build_eval_data(new, "test", image_size=SIZE, workers=0, tokenizer=tokenizer)
    records = load_split(new, "test").records
    expected = annotation_captions(mess, "test", records)
    assert test_caption in expected and tokenizer.seen[-1] == expected
    assert data.query_tokens.tolist() == [authors_ids(slow, c) for c in expected]
    assert data.query_captions == [c for r in records for c in r["captions"]]  # pages show the cleaned text
    assert "&amp;" not in " ".join(data.query_captions)


@pytest.mark.parametrize("name", NAMES)
def test_clip_tokens_are_those_of_the_cleaned_captions_in_both_formats(messy, name):
    _, new, old = messy[name]
    for folder in (new, old):
        for split in ("train", "test"):
            records = json.loads((folder / f"{split}_reid.json").read_text())
            cleaned = [c for r in records for c in r["captions"]]
            if split == "train":
                tokens = build_train_loader(folder, image_size=SIZE, batch_size=4, workers=0).dataset.tokens
            else:
                tokens = build_eval_data(folder, split, image_size=SIZE, workers=0).query_tokens
            assert torch.equal(tokens, clip_token_ids(cleaned)), (folder, split)
    for split in ("train", "test"):  # the new format changes no cleaned caption
        strip = [{k: v for k, v in r.items() if k != "raw_captions"}
                 for r in json.loads((new / f"{split}_reid.json").read_text())]
        assert strip == json.loads((old / f"{split}_reid.json").read_text())


@pytest.mark.parametrize("name", NAMES)
def test_bert_mode_refuses_an_older_data_sh_output_in_one_line(messy, bert_tokenizer, name):
    _, _, old = messy[name]
    rerun = rf"re-run `bash data\.sh <dataset_root> {name}`"
    for build in (lambda: build_train_loader(old, image_size=SIZE, batch_size=4, workers=0, tokenizer=bert_tokenizer),
                  lambda: build_eval_data(old, "test", image_size=SIZE, workers=0, tokenizer=bert_tokenizer)):
        with pytest.raises(DataError, match=rf"{old}.* older data\.sh.*{rerun}") as caught:
            build()
        assert "\n" not in str(caught.value)


def test_train_py_in_bert_mode_refuses_an_older_output_before_writing(messy, tmp_path):
    _, _, old = messy["CUHK-PEDES"]
    bert = write_bert_folder(tmp_path / "bert", hidden=64)
    out = tmp_path / "run"
    args = train.parse_args(["--data_root", str(old.parent), "--output_dir", str(out), *TINY_TRAIN_FLAGS, "--epochs",
                             "1", "--text_encoder", "bert", "--bert", str(bert), "--mean_std", "imagenet", "--amp", "off"])
    with pytest.raises(CFineError, match=r"older data\.sh.*re-run `bash data\.sh <dataset_root> CUHK-PEDES`"):
        train.main(args)
    assert not out.exists()


def test_only_records_that_cleaning_changed_carry_raw_captions(messy):
    mess, new, old = messy["CUHK-PEDES"]
    _, raw = read_annotation(mess.dataset_dir)
    changed = {raw[i][mess.image_key] for i in (mess.html_record, mess.html_test_record)}  # the rest is clean text
    for split in ("train", "val", "test"):
        for record in json.loads((new / f"{split}_reid.json").read_text()):
            assert ("raw_captions" in record) == (record["image"] in changed), record
            if "raw_captions" in record:
                assert len(record["raw_captions"]) == len(record["captions"])
    assert json.loads((new / "meta.json").read_text())["format_version"] > json.loads(
        (old / "meta.json").read_text())["format_version"]


def test_a_runs_data_check_accepts_the_same_annotation_rewritten_by_the_new_data_sh(messy):
    _, new, old = messy["RSTPReid"]
    assert data_identity(old) == data_identity(new)
    check_same_data(data_identity(old), new, "last.pt")  # a run on the old output resumes on the new one


def test_an_older_output_is_rebuilt_by_the_next_data_sh_run(messy, tmp_path, capsys):
    mess, _, _ = messy["ICFG-PEDES"]
    out = tmp_path / "processed_data"
    prepare_as_older_data_sh(mess.dataset_dir.parent, "ICFG-PEDES", out)
    capsys.readouterr()
    prepare_into(mess.dataset_dir.parent, "ICFG-PEDES", out)
    assert "up to date" not in capsys.readouterr().out  # same input, but the format changed
    assert any("raw_captions" in r for r in json.loads((out / "ICFG-PEDES" / "train_reid.json").read_text()))
    prepare_into(mess.dataset_dir.parent, "ICFG-PEDES", out)
    assert "up to date" in capsys.readouterr().out


@pytest.mark.parametrize("raw_captions", [[], ["one"], ["one", 2], ["one", ""], "one two"])
def test_malformed_raw_captions_in_a_split_file_are_data_errors(messy, tmp_path, raw_captions):
    _, new, _ = messy["ICFG-PEDES"]
    copy = tmp_path / "ICFG-PEDES"
    copy.mkdir()
    for path in new.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    records = json.loads((copy / "train_reid.json").read_text())
    records[3] = dict(records[3], captions=["one", "two"], raw_captions=raw_captions)
    (copy / "train_reid.json").write_text(json.dumps(records))
    with pytest.raises(DataError, match="record 3 is not .*'raw_captions': as many non-empty str"):
        load_split(copy, "train")


def test_the_cost_of_raw_captions_is_the_changed_records_own_strings(messy):
    """The new files are larger by the raw captions of the records cleaning changed, and nothing else."""
    mess, new, old = messy["CUHK-PEDES"]
    grown = sum((new / f"{s}_reid.json").stat().st_size - (old / f"{s}_reid.json").stat().st_size
                for s in ("train", "val", "test"))
    added = [r["raw_captions"] for s in ("train", "val", "test") for r in json.loads((new / f"{s}_reid.json").read_text())
             if "raw_captions" in r]
    assert added and grown == sum(len(', "raw_captions": '.encode()) + len(json.dumps(a, ensure_ascii=False).encode())
                                  for a in added)
