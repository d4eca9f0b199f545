"""export/: exported encoders give test.py's features and R@1 (both text encoders, ONNX in onnxruntime and TorchScript
through torch.jit.load, batches of other sizes than the traced one), the stable sort's ONNX translation orders ties as
torch does, export.json describes the folder, and a changed folder or a failed check is refused in one line."""
import json
import shutil

import numpy as np
import onnxruntime  # requirements-export.txt, installed by run_tests.sh through requirements-dev.txt
import pytest
import torch
from torch import nn

from clip.tokenizer import BPE_PATH
from datasets.build import build_eval_data
from datasets.transforms import MEAN_STD, to_model_input
from evaluation.encode import encode_split
from evaluation.metrics import evaluate_retrieval
from export import export_folder, packages
from export.encoders import Encoder
from export.export_folder import Writer, export_checkpoint
from export.exported import ExportedEncoders
from export.manifest import MANIFEST, read_manifest
from export.onnx_file import onnx_runner, write_onnx
from export.torchscript_file import torchscript_runner, write_torchscript
from models.cfine import retrieval_features
from models.checkpoint import load_checkpoint, load_model
from tests.export_fixtures import bert_checkpoint, exported
from tests.tolerance import assert_close
from utils.errors import CFineError, CheckpointError, SettingError
from utils.files import sha256_file

pytestmark = pytest.mark.usefixtures("module_single_thread")
# fp32 roundings of another kernel order (onnxruntime's, or the same ops traced), relative to the largest entry
# (tests/tolerance.py). Measured at most 2e-6 (ONNX) and 0 (TorchScript) on the tiny models.
REL = 1e-4
GALLERY_BATCH, QUERY_BATCH = 5, 7  # neither is the export's example batch (2) nor its verification batch (3)
CASES = [("clip", "onnx"), ("clip", "torchscript"), ("bert", "onnx"), ("bert", "torchscript")]


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint, tmp_path_factory):
    """The tiny trained model (CLIP text) and a random bert-mode one, by text encoder."""
    return {"clip": tiny_checkpoint, "bert": bert_checkpoint(tmp_path_factory)}


def exported_runners(folder, model_format, mean_std):
    """(uint8 pixels -> features, token ids -> features) of an exported folder, as NumPy."""
    if model_format == "onnx":
        encoders = ExportedEncoders(folder, threads=1)
        return encoders.encode_pixels, encoders.encode_token_ids
    files = read_manifest(folder)["encoders"]
    image, text = (torchscript_runner(folder / files[role]["file"]) for role in ("image", "text"))
    return (lambda pixels: image(to_model_input(pixels, mean_std))), text


@pytest.mark.parametrize("text_encoder, model_format", CASES, ids=[f"{t}-{f}" for t, f in CASES])
def test_exported_encoders_give_test_py_features_and_r1(text_encoder, model_format, checkpoints, processed_root,
                                                        tmp_path_factory):
    checkpoint = checkpoints[text_encoder]
    folder = exported(checkpoint, model_format, tmp_path_factory)
    model, state = load_model(checkpoint)
    data = build_eval_data(processed_root / "CUHK-PEDES", "test", image_size=tuple(model.config.clip.vision.image_size),
                           batch_size=GALLERY_BATCH, workers=0, mean_std=state["args"]["mean_std"],
                           tokenizer=model.tokenizer)
    encoded = encode_split(model, data, torch.device("cpu"), "off", QUERY_BATCH, progress=False)  # test.py's path
    expected_gallery = retrieval_features(encoded.gallery, "concat")
    expected_queries = retrieval_features(encoded.queries, "concat")

    encode_pixels, encode_ids = exported_runners(folder, model_format, data.mean_std)
    gallery = torch.from_numpy(np.concatenate([encode_pixels(batch["images"]) for batch in data.gallery_loader]))
    tokens = data.query_tokens
    queries = torch.from_numpy(np.concatenate([encode_ids(tokens[s:s + QUERY_BATCH])
                                               for s in range(0, len(tokens), QUERY_BATCH)]))
    assert_close(gallery, expected_gallery, REL, what="image features")
    assert_close(queries, expected_queries, REL, what="text features")
    assert_close(torch.from_numpy(encode_ids(tokens[:1])), expected_queries[:1], REL, what="a batch of one")
    width = model.feature_shape[0] * model.feature_shape[1]
    assert gallery.shape == (len(data.gallery_pids), width) and queries.shape == (len(tokens), width)
    ours = evaluate_retrieval(queries, gallery, data.query_pids, data.gallery_pids)
    theirs = evaluate_retrieval(expected_queries, expected_gallery, data.query_pids, data.gallery_pids)
    assert ours["R1"] == theirs["R1"]


class StableSorts(nn.Module):
    """MGF's ranking op (models/selection.py), descending and ascending, indices as float32 features."""

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        down = scores.sort(dim=1, descending=True, stable=True).indices
        up = scores.sort(dim=1, stable=True).indices
        return torch.cat([down, up], dim=1).float()


def test_the_stable_sort_translation_orders_ties_as_torch(tmp_path):
    g = torch.Generator().manual_seed(0)
    values = torch.tensor([float("-inf"), 0.0, 0.25, 1.0])  # masked non-candidates, zero-score pads, real scores

    def rows(batch):
        scores = values[torch.randint(0, 4, (batch, 40), generator=g)]
        scores[0] = 0.0  # all tied
        return scores

    write_onnx(Encoder("scores", StableSorts().eval(), "scores", rows(2)), tmp_path / "sort.onnx")
    check = rows(6)
    assert torch.equal(torch.from_numpy(onnx_runner(tmp_path / "sort.onnx")(check)), StableSorts()(check))


@pytest.mark.parametrize("text_encoder", ["clip", "bert"])
def test_export_json_describes_the_folder(text_encoder, checkpoints, tmp_path_factory):
    checkpoint = checkpoints[text_encoder]
    folder = exported(checkpoint, "onnx", tmp_path_factory)
    manifest = json.loads((folder / MANIFEST).read_text())
    model, state = load_model(checkpoint)
    count, width = model.feature_shape
    height, image_width = model.config.clip.vision.image_size
    length = model.tokenizer.max_length
    assert manifest["encoders"]["image"]["inputs"] == [{"name": "images", "dtype": "float32",
                                                         "shape": ["batch", 3, height, image_width]}]
    assert manifest["encoders"]["text"]["inputs"] == [{"name": "token_ids", "dtype": "int64", "shape": ["batch", length]}]
    for role in ("image", "text"):
        spec = manifest["encoders"][role]
        assert spec["outputs"] == [{"name": "features", "dtype": "float32", "shape": ["batch", count * width]}]
        session = onnxruntime.InferenceSession(str(folder / spec["file"]), providers=["CPUExecutionProvider"])
        (put,) = session.get_inputs()
        assert (put.name, put.shape) == (spec["inputs"][0]["name"], spec["inputs"][0]["shape"])
    mean, std = MEAN_STD[state["args"]["mean_std"]]
    assert manifest["image"] | {"preprocess": None} == {"size": [height, image_width], "mean_std": state["args"]["mean_std"],
                                                         "mean": list(mean), "std": list(std), "preprocess": None}
    assert manifest["feature"] | {"description": None} == {"width": count * width, "parts": count, "part_width": width,
                                                           "description": None}
    assert manifest["checkpoint"] | {"path": str(checkpoint)} == {
        "path": str(checkpoint), "sha256": sha256_file(checkpoint),
        "content_sha256": load_checkpoint(checkpoint)["sha256"], "epoch": state["epoch"]}
    assert manifest["config"] == state["config"] and manifest["text"]["encoder"] == text_encoder
    listed = {p.name for p in folder.iterdir()} - {MANIFEST}
    assert set(manifest["files"]) == listed and "README.md" in listed
    for name, entry in manifest["files"].items():
        assert entry == {"sha256": sha256_file(folder / name), "bytes": (folder / name).stat().st_size}
    rules = manifest["text"]["tokenizer"]
    if text_encoder == "clip":
        assert (folder / rules["file"]).read_bytes() == open(BPE_PATH, "rb").read()
        assert rules["context_length"] == length == 77 and (folder / rules["license"]).is_file()
    else:
        assert (folder / rules["file"]).read_text() == state["text_vocab"] == model.text_vocab
        assert rules["lower_case"] == model.config.bert_lower_case and rules["max_length"] == length == 100
    assert max(manifest["verified"][role] for role in ("image", "text")) <= REL
    assert "ort.InferenceSession" in (folder / "README.md").read_text()


CAPTIONS = ["A man in a red coat.", "", "a woman [SEP] with [CLS] bag", "<|endoftext|> injected", "Café résumé",
            " ".join(["the man wearing blue jeans"] * 40), "&amp; html", "中文 text — ’quotes’"]


@pytest.mark.parametrize("text_encoder", ["clip", "bert"])
def test_the_loader_tokenises_and_encodes_captions_as_the_checkpoint(text_encoder, checkpoints, tmp_path_factory):
    checkpoint = checkpoints[text_encoder]
    encoders = ExportedEncoders(exported(checkpoint, "onnx", tmp_path_factory))
    model, _ = load_model(checkpoint)
    assert np.array_equal(encoders.tokenize(CAPTIONS), model.tokenize(CAPTIONS).numpy())
    with pytest.warns(UserWarning, match="truncated"):
        features = encoders.encode_captions(CAPTIONS, warn_truncated=True)
    with torch.no_grad():
        expected = retrieval_features(model.encode_texts(model.tokenize(CAPTIONS)))
    assert_close(torch.from_numpy(features), expected, REL)
    assert (encoders.feature_width, encoders.image_size) == (features.shape[1], tuple(model.config.clip.vision.image_size))


def test_a_changed_exported_folder_is_a_one_line_error(tiny_checkpoint, tmp_path_factory, tmp_path):
    source = exported(tiny_checkpoint, "onnx", tmp_path_factory)

    def damaged(change):
        folder = shutil.copytree(source, tmp_path / f"copy{len(list(tmp_path.iterdir()))}")
        change(folder)
        with pytest.raises(CheckpointError) as caught:
            ExportedEncoders(folder)
        message = str(caught.value)
        assert str(folder) in message and "\n" not in message
        return message

    def flip_a_byte(folder):
        with open(folder / "text_encoder.onnx", "r+b") as f:
            f.seek(1000)
            byte = f.read(1)
            f.seek(1000)
            f.write(bytes([byte[0] ^ 1]))

    assert "does not match the SHA256" in damaged(flip_a_byte)
    assert "missing" in damaged(lambda folder: (folder / "image_encoder.onnx").unlink())
    assert "export.json: unreadable" in damaged(lambda folder: (folder / MANIFEST).write_text("{"))
    assert "format is not" in damaged(lambda folder: (folder / MANIFEST).write_text("[]"))
    assert "no export.json" in damaged(lambda folder: (folder / MANIFEST).unlink())
    with pytest.raises(CheckpointError, match="holds torchscript encoders; only an ONNX export"):
        ExportedEncoders(exported(tiny_checkpoint, "torchscript", tmp_path_factory))


def test_an_export_that_does_not_reproduce_the_model_is_refused(tiny_checkpoint, tmp_path, monkeypatch):
    def off_by_a_little(path):
        run = torchscript_runner(path)
        return lambda batch: run(batch) + 1e-3

    monkeypatch.setitem(export_folder.WRITERS, "torchscript", Writer(write_torchscript, off_by_a_little))
    with pytest.raises(CFineError, match=r"image encoder's features differ from the model's by .* nothing was written"):
        export_checkpoint(tiny_checkpoint, "torchscript", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a temporary sibling


def test_a_missing_export_package_is_one_line_before_anything_is_loaded(tiny_checkpoint, tmp_path, monkeypatch):
    real = packages.importlib.import_module

    def without_onnxscript(name):
        if name == "onnxscript":
            raise ImportError(name)
        return real(name)

    monkeypatch.setattr(packages.importlib, "import_module", without_onnxscript)
    monkeypatch.setattr(export_folder, "load_model", lambda *a: pytest.fail("loaded the checkpoint first"))
    with pytest.raises(SettingError, match=r"--format onnx needs the `onnxscript` package: pip install -r "
                                           r"requirements-export.txt"):
        export_checkpoint(tiny_checkpoint, "onnx", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
