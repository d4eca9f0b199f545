"""search.py with an exported ONNX folder as --checkpoint: the encoders run in onnxruntime and no CFine is built, the
top-10 lists are the checkpoint's, and an index records the export so that only the same weights can query or update
it (the checkpoint it came from included); folders search cannot run are one-line errors."""
import json
import re

import numpy as np
import pytest
import torch

import models.cfine
import search
from datasets.build import build_eval_data
from models.cfine import retrieval_features
from models.checkpoint import load_model, save_checkpoint
from retrieval import search_model
from retrieval.index import read_index
from tests.export_fixtures import bert_checkpoint, exported
from tests.test_retrieval_search import build, run_search
from tests.tolerance import assert_close
from utils.errors import SearchIndexError, run_main
from utils.files import sha256_file

pytestmark = pytest.mark.usefixtures("module_single_thread")


@pytest.fixture(scope="module")
def onnx_folder(tiny_checkpoint, tmp_path_factory):
    return exported(tiny_checkpoint, "onnx", tmp_path_factory)


def top10(index, captions, capsys) -> list[list[str]]:
    capsys.readouterr()
    assert run_search("query", "--index", index, "--device", "cpu", "--top_k", "10", "--json", *captions) == 0
    return [[r["path"] for r in json.loads(line)["results"]] for line in capsys.readouterr().out.splitlines()]


def test_the_onnx_folder_builds_no_cfine_and_gives_the_checkpoints_top10(tiny_checkpoint, onnx_folder, processed_root,
                                                                          test_split_photos, tmp_path, capsys,
                                                                          monkeypatch):
    model, state = load_model(tiny_checkpoint)
    captions = build_eval_data(processed_root / "CUHK-PEDES", "test", image_size=tuple(model.config.clip.vision.image_size),
                               workers=0, mean_std=state["args"]["mean_std"]).query_captions
    assert build(tiny_checkpoint, test_split_photos, tmp_path / "checkpoint") == 0
    expected = top10(tmp_path / "checkpoint", captions, capsys)
    with torch.no_grad():  # the checkpoint's scores, to tell a swap of near-equal scores from a wrong ranking
        queries = retrieval_features(model.encode_texts(model.tokenize(captions)))
    by_checkpoint = read_index(tmp_path / "checkpoint")
    scores = queries @ torch.from_numpy(np.array(by_checkpoint.features)).float().T
    row = {image.path: r for r, image in enumerate(by_checkpoint.images)}

    def no_cfine(*args, **kwargs):
        raise AssertionError("a CFine was built")

    monkeypatch.setattr(models.cfine.CFine, "__init__", no_cfine)
    monkeypatch.setattr(search_model, "load_model", no_cfine)
    assert build(onnx_folder, test_split_photos, tmp_path / "onnx") == 0
    by_export = read_index(tmp_path / "onnx")
    assert [i.path for i in by_export.images] == [i.path for i in by_checkpoint.images]
    # fp32 features within ~1e-6 round to the same fp16 value or a neighbouring one (one step: 2^-10 of the largest)
    assert_close(torch.from_numpy(np.array(by_export.features)).float(),
                 torch.from_numpy(np.array(by_checkpoint.features)).float(), 2**-10)
    found = top10(tmp_path / "onnx", captions, capsys)
    assert len(found) == len(captions) == 25
    for q, (ours, theirs) in enumerate(zip(found, expected)):
        for a, b in zip(ours, theirs):
            if a != b:  # only between scores within the fp16 rounding of the stored features (2^-10 < 1e-3)
                assert abs(scores[q, row[a]] - scores[q, row[b]]) < 1e-3
    assert sum(ours == theirs for ours, theirs in zip(found, expected)) >= 20


def test_the_onnx_folder_tells_truncated_captions_as_the_checkpoint_does(tiny_checkpoint, onnx_folder):
    captions = ["a man in a red coat", "a woman with a black backpack " * 20, "word " * 75, "word " * 76]
    from_checkpoint = search_model.load_search_model(tiny_checkpoint, torch.device("cpu")).truncated(captions)
    assert search_model.load_search_model(onnx_folder, torch.device("cpu")).truncated(captions) == from_checkpoint
    assert from_checkpoint == [False, True, False, True]  # 75 words + start and end: 77 tokens; 76 words: 78


def test_an_index_records_the_export_and_takes_only_the_same_weights(tiny_checkpoint, onnx_folder, test_split_photos,
                                                                     tmp_path, tmp_path_factory, capsys):
    index = tmp_path / "index"
    assert build(onnx_folder, test_split_photos, index) == 0
    recorded = json.loads((index / "manifest.json").read_text())["checkpoint"]
    assert recorded == {"path": str(onnx_folder), "sha256": sha256_file(onnx_folder / "export.json"),
                        "exported_from": sha256_file(tiny_checkpoint)}
    assert run_search("query", "--index", index, "--checkpoint", tiny_checkpoint, "--device", "cpu", "someone") == 0
    assert build(tiny_checkpoint, test_split_photos, index) == 0  # the same weights: nothing is encoded again
    assert "encoded 0 new or changed, reused 12" in capsys.readouterr().out
    assert run_search("query", "--index", index, "--checkpoint", onnx_folder, "--device", "cpu", "someone") == 0

    other = tmp_path / "other.pt"
    state = torch.load(tiny_checkpoint, weights_only=True)
    state["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in state["model"].items()}
    save_checkpoint({k: v for k, v in state.items() if k != "format"}, other)
    with pytest.raises(SearchIndexError, match="is not the checkpoint .* was built with, nor an export of it"):
        run_search("query", "--index", index, "--checkpoint", other, "--device", "cpu", "someone")
    bert_export = exported(bert_checkpoint(tmp_path_factory), "onnx", tmp_path_factory)
    with pytest.raises(SearchIndexError, match="was built with another checkpoint"):
        build(bert_export, test_split_photos, index)


@pytest.mark.parametrize("case, message", [
    ("torchscript", "holds torchscript encoders; only an ONNX export runs here"),
    ("plain folder", "is a folder without export.json"),
    ("amp", "--amp bf16: .* is an exported ONNX folder, which runs in fp32"),
])
def test_folders_search_cannot_run_are_one_line_errors(case, message, tiny_checkpoint, onnx_folder, test_split_photos,
                                                       tmp_path, tmp_path_factory, capsys):
    checkpoint = {"torchscript": exported(tiny_checkpoint, "torchscript", tmp_path_factory),
                  "plain folder": test_split_photos, "amp": onnx_folder}[case]
    argv = ["index", "--checkpoint", checkpoint, "--images", test_split_photos, "--out", tmp_path / "index", "--device",
            "cpu", "--workers", "0", "--no_progress", *(["--amp", "bf16"] if case == "amp" else [])]
    assert run_main(search.main, search.get_args_parser().parse_args([str(a) for a in argv])) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and re.search(message, error), error
    assert not (tmp_path / "index").exists()
