"""evaluation/zero_shot.py and test.py --zero_shot: CLIP's own pooled features against open_clip's encode_image and
encode_text on the same random-weight checkpoint and the same synthetic split (features, the image pipeline,
metrics.json), under torchrun as in one process, and the flags' and data's one-line errors."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import test as evaluate_script
from clip import loading
from datasets import prepare
from datasets.build import build_eval_data
from datasets.synthetic.generate import generate as generate_synthetic
from datasets.transforms import MEAN_STD, load_rgb, to_model_input
from evaluation.encode import encode_split
from evaluation.feature_file import FEATURE_KEYS
from evaluation.metrics import evaluate_retrieval
from evaluation.zero_shot import ZeroShotCLIP, load_zero_shot
from models.cfine import retrieval_features
from tests.test_clip_loading import _open_clip_tiny
from tests.test_distributed import finish, torchrun
from tests.tolerance import assert_close
from utils.errors import CFineError, run_main

pytestmark = pytest.mark.usefixtures("module_single_thread")

# fp32 roundings of our modules vs open_clip's (another summation order), relative to the largest entry
# (tests/tolerance.py). Measured over its CPU settings (1 and 2 threads; ATen capability AVX-512, AVX2, default):
# text at most 1.1e-6, images on the same input tensor at most 2.8e-7 (0 but for the scalar 'default' kernels).
REL_TEXT = 1e-5
REL_IMAGE = 5e-6
# The whole image pipeline adds the resize: ours (datasets/transforms.py, PIL's bicubic through torchvision) against
# open_clip's 'squash' transform (torchvision's Resize on the PIL image: PIL's bicubic again, then the same
# /255 and mean/std). Measured bit-equal inputs, so the features differ as on one tensor (2.8e-7); the bound allows
# another PIL or torchvision to round a pixel to the next uint8 level: moving every pixel of the split by one level
# moved this model's features by 2.6e-3 of the largest entry.
ONE_LEVEL = 1 / 255 / min(MEAN_STD["clip"][1])  # one uint8 step after normalisation
REL_PIPELINE = 1e-2


@pytest.fixture(scope="module")
def reference():
    """tests/test_clip_loading.py's tiny open_clip CLIP (QuickGELU, 32x32 images, random weights)."""
    return _open_clip_tiny(quick_gelu=True)[0]


@pytest.fixture(scope="module")
def weights(reference, tmp_path_factory):
    """The reference's weights as a plain state dict file (a format clip.load reads)."""
    path = tmp_path_factory.mktemp("open_clip") / "tiny_open_clip.pt"
    torch.save(reference.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def ours(weights):
    return load_zero_shot(weights)


@pytest.fixture(scope="module")
def split(processed_root, ours):
    """The synthetic test split as test.py --zero_shot builds it (native resolution, CLIP's mean/std), encoded."""
    data = build_eval_data(processed_root / "CUHK-PEDES", "test", image_size=ours.image_size, batch_size=64,
                           workers=0, tokenizer=ours.tokenizer)
    return data, encode_split(ours, data, torch.device("cpu"), progress=False)


def open_clip_features(reference, data):
    """open_clip's own path, L2-normalised: its tokenizer and encode_text; its 'squash' eval transform and
    encode_image. Returns (gallery, queries)."""
    import open_clip  # test-only dependency (requirements-dev.txt)
    from open_clip.transform import image_transform

    preprocess = image_transform(reference.visual.image_size, is_train=False, mean=MEAN_STD["clip"][0],
                                 std=MEAN_STD["clip"][1], resize_mode="squash", interpolation="bicubic")
    images = torch.stack([preprocess(load_rgb(path)) for path in data.gallery_paths])
    tokens = open_clip.get_tokenizer("ViT-B-16")(data.query_captions)
    with torch.no_grad():
        return (F.normalize(reference.encode_image(images), dim=-1), F.normalize(reference.encode_text(tokens), dim=-1),
                images)


def test_zero_shot_model_is_clip_at_its_native_resolution(ours, reference):
    assert isinstance(ours, ZeroShotCLIP) and not ours.training
    assert ours.image_size == tuple(reference.visual.image_size)
    assert ours.feature_shape == (1, reference.text_projection.shape[1])
    assert ours.tokenizer.max_length == 77


def test_text_features_match_open_clip(reference, split):
    data, encoded = split
    _, queries, _ = open_clip_features(reference, data)
    assert_close(retrieval_features(encoded.queries), queries, REL_TEXT, what="text")


def test_image_features_on_the_same_input_tensor_match_open_clip(reference, ours, split):
    data, _ = split
    batch = next(iter(data.gallery_loader))
    images = to_model_input(batch["images"], "clip")
    with torch.no_grad():
        expected = F.normalize(reference.encode_image(images), dim=-1)
        assert_close(retrieval_features(ours.encode_images(images)), expected, REL_IMAGE, what="image, one tensor")


def test_image_pipeline_matches_open_clip_preprocessing(reference, split):
    data, encoded = split
    gallery, _, open_clip_inputs = open_clip_features(reference, data)
    inputs = torch.cat([to_model_input(batch["images"], "clip") for batch in data.gallery_loader])
    assert_close(inputs, open_clip_inputs, ONE_LEVEL, scale=1.0, what="preprocessed images")
    assert_close(retrieval_features(encoded.gallery), gallery, REL_PIPELINE, what="image, whole pipeline")


def assert_same_rankings(ours_q, ours_g, ref_q, ref_g):
    """Both similarity matrices rank every row alike: their difference is below half the smallest gap between two
    scores of a row, so metrics computed from either are equal (not by luck of the draw)."""
    ours, ref = ours_q @ ours_g.t(), ref_q @ ref_g.t()
    gaps = ref.sort(dim=1).values.diff(dim=1)
    assert float((ours - ref).abs().max()) < float(gaps.min()) / 2


def test_test_py_zero_shot_writes_open_clips_metrics_and_features(reference, weights, processed_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default output folder is relative: runs/zero_shot/<dataset>_<split>
    args = evaluate_script.parse_args(["--zero_shot", "--clip", str(weights), "--dataset", "CUHK-PEDES",
                                       "--data_root", str(processed_root), "--save_features", "features.npz",
                                       "--workers", "0", "--no_progress", "--device", "cpu"])
    assert evaluate_script.main(args) == 0
    metrics = json.loads((tmp_path / "runs" / "zero_shot" / "CUHK-PEDES_test" / "metrics.json").read_text())
    assert {k: metrics[k] for k in ("zero_shot", "clip", "dataset", "split")} == {
        "zero_shot": True, "clip": str(weights), "dataset": "CUHK-PEDES", "split": "test"}
    assert set(metrics) == {"zero_shot", "clip", "dataset", "split", "t2i", "i2t", "t2i_global", "i2t_global", "machine"}
    # One feature: it is its own global one (the keys stay those of a CFine evaluation).
    assert (metrics["t2i_global"], metrics["i2t_global"]) == (metrics["t2i"], metrics["i2t"])

    data = build_eval_data(processed_root / "CUHK-PEDES", "test", image_size=tuple(reference.visual.image_size),
                           workers=0)
    gallery, queries, _ = open_clip_features(reference, data)
    saved = np.load(tmp_path / "features.npz", allow_pickle=False)
    assert set(saved.files) == set(FEATURE_KEYS)
    ours_g, ours_q = torch.from_numpy(saved["gallery"]), torch.from_numpy(saved["query"])
    assert_close(ours_q, queries, REL_TEXT, what="saved text")
    assert_close(ours_g, gallery, REL_PIPELINE, what="saved images")
    assert_same_rankings(ours_q, ours_g, queries, gallery)
    assert metrics["t2i"] == evaluate_retrieval(queries, gallery, data.query_pids, data.gallery_pids)
    assert metrics["i2t"] == evaluate_retrieval(gallery, queries, data.gallery_pids, data.query_pids)


def test_zero_shot_under_torchrun_equals_one_process(weights, processed_root, tmp_path):
    flags = ["--zero_shot", "--clip", weights, "--dataset", "CUHK-PEDES", "--data_root", processed_root,
             "--batch_size", "4", "--workers", "0", "--no_progress", "--device", "cpu"]
    one = ["--output_dir", tmp_path / "one", "--save_features", tmp_path / "one.npz"]
    assert run_main(evaluate_script.main, evaluate_script.parse_args(list(map(str, flags + one)))) == 0
    code, stdout, stderr = finish(torchrun("test.py", *flags, "--output_dir", tmp_path / "two",
                                           "--save_features", tmp_path / "two.npz"))
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    assert stdout.count("text->image [CLIP pooled]") == 1 and "global only" not in stdout  # rank 0 alone prints
    single, double = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("one", "two"))
    assert {k: v for k, v in double.items() if k != "machine"} == {k: v for k, v in single.items() if k != "machine"}
    one_file, two_file = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    for key in FEATURE_KEYS:
        assert np.array_equal(one_file[key], two_file[key]), key


@pytest.mark.parametrize("argv, message", [
    (["--zero_shot", "--clip", "c.pt", "--dataset", "CUHK-PEDES", "--checkpoint", "best.pt"],
     "--zero_shot evaluates CLIP's own features and takes no --checkpoint"),
    (["--zero_shot", "--dataset", "CUHK-PEDES"], "--zero_shot needs --clip NAME_OR_PATH (the CLIP weights)"),
    (["--zero_shot", "--clip", "c.pt"], "--zero_shot needs --dataset NAME (the benchmark to rank)"),
    (["--zero_shot", "--clip", "c.pt", "--dataset", "RSTPReid", "--plot"], "--plot draws a training run's curves"),
    ([], "the following arguments are required: --checkpoint (or --zero_shot with --clip and --dataset)"),
    (["--checkpoint", "best.pt", "--clip", "c.pt"], "--clip is --zero_shot's: a checkpoint carries its own"),
])
def test_flag_combinations_are_one_line_with_exit_status_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate_script.parse_args(argv)
    assert exit_info.value.code == 2
    assert f"error: {message}" in capsys.readouterr().err.strip().splitlines()[-1]  # argparse's usage, then one line


def test_zero_shot_val_on_a_dataset_without_one_is_one_line(weights, tmp_path, capsys):
    generate_synthetic(tmp_path / "raw", "ICFG-PEDES", ids=8, images_per_id=2, seed=1)
    assert prepare.main([str(tmp_path / "raw"), "ICFG-PEDES", "--out", str(tmp_path / "processed"),
                         "--workers", "1"]) == 0
    args = evaluate_script.parse_args(["--zero_shot", "--clip", str(weights), "--dataset", "ICFG-PEDES",
                                       "--data_root", str(tmp_path / "processed"), "--split", "val",
                                       "--output_dir", str(tmp_path / "eval"), "--device", "cpu"])
    capsys.readouterr()
    assert run_main(evaluate_script.main, args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ICFG-PEDES has no val split (it has: train, test); --zero_shot has no training " \
                                      "run whose held-out ids could make one: evaluate on --split test" in err
    assert not (tmp_path / "eval").exists()


def test_a_released_name_without_its_file_offline_is_one_line(processed_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loading, "_URL", "http://127.0.0.1:9/{sha}/{file}")  # nothing listens on port 9
    monkeypatch.setattr(loading, "default_cache_dir", lambda: tmp_path / "cache")
    args = evaluate_script.parse_args(["--zero_shot", "--clip", "ViT-B/16", "--dataset", "CUHK-PEDES",
                                       "--data_root", str(processed_root), "--output_dir", str(tmp_path / "eval"),
                                       "--device", "cpu"])
    assert run_main(evaluate_script.main, args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "could not be downloaded" in err and "ViT-B-16.pt" in err
    assert not (tmp_path / "eval").exists()


def test_zero_shot_checks_its_output_folder_before_evaluating(weights, processed_root, tmp_path, monkeypatch):
    (tmp_path / "taken").write_text("a file, not a folder")
    monkeypatch.setattr(evaluate_script, "encode_split", lambda *a, **k: pytest.fail("evaluated first"))
    args = evaluate_script.parse_args(["--zero_shot", "--clip", str(weights), "--dataset", "CUHK-PEDES",
                                       "--data_root", str(processed_root), "--output_dir", str(tmp_path / "eval"),
                                       "--save_features", str(tmp_path / "taken" / "f.npz"), "--device", "cpu"])
    with pytest.raises(CFineError, match="--save_features .*taken/f.npz: cannot write there"):
        evaluate_script.main(args)

