"""Shared fixtures and helpers: one small synthetic benchmark (prepared by data.sh's module) and one tiny trained
checkpoint per test session; metrics.jsonl rows, tensor-dict equality, moved data copies, one-thread sections."""
import contextlib
import json
import shutil
from pathlib import Path

import pytest
import torch

import train
from datasets import prepare
from datasets.processed import load_split
from datasets.synthetic.generate import generate as generate_synthetic

REPO = Path(__file__).resolve().parents[1]

# Small but CFine-shaped: 64x32 images with 8-pixel patches give 33 image tokens (k_img = 3).
TINY_TRAIN_FLAGS = ["--clip", "none", "--clip_arch", "tiny", "--image_size", "64", "32", "--batch_size", "16",
                    "--lr_head", "1e-3", "--lr_image", "1e-3", "--lr_text", "1e-3", "--warmup_epochs", "1",
                    "--milestones", "3", "--workers", "0", "--no_progress", "--device", "cpu"]


@pytest.fixture(scope="session")
def processed_root(tmp_path_factory) -> Path:
    """processed_data-style folder holding a synthetic CUHK-PEDES (40 ids x 3 images)."""
    base = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(base / "raw", "CUHK-PEDES", ids=40, images_per_id=3, seed=1)
    out = base / "processed_data"
    assert prepare.main([str(base / "raw"), "CUHK-PEDES", "--out", str(out), "--workers", "1"]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(processed_root, tmp_path_factory) -> Path:
    """best.pt of the tiny model trained one epoch on processed_root (for tests that need a real checkpoint)."""
    out = tmp_path_factory.mktemp("tiny_run")
    args = train.parse_args(["--data_root", str(processed_root), "--output_dir", str(out), *TINY_TRAIN_FLAGS,
                             "--epochs", "1"])
    assert train.main(args) == 0
    return out / "best.pt"


@pytest.fixture(scope="session")
def test_split_photos(processed_root, tmp_path_factory) -> Path:
    """The test split's images copied into a folder of their own (relative paths kept): a user's photo folder."""
    split = load_split(processed_root / "CUHK-PEDES", "test")
    out = tmp_path_factory.mktemp("photos")
    for record in split.records:
        (out / record["image"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(split.image_root / record["image"], out / record["image"])
    return out


SOT, EOT = 49406, 49407


def random_caption_ids(batch: int, seed: int = 0) -> torch.Tensor:
    """Synthetic CLIP token ids (batch, 77): SOT, random words, EOT, zero padding; caption lengths vary."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(batch, 77, dtype=torch.long)
    ids[:, 0] = SOT
    for b, eot in enumerate(torch.randint(3, 40, (batch,), generator=g).tolist()):
        ids[b, 1:eot] = torch.randint(1, SOT, (eot - 1,), generator=g)
        ids[b, eot] = EOT
    return ids


@contextlib.contextmanager
def one_intra_op_thread():
    """One intra-op thread inside the block, then the previous setting."""
    # Tiny tensors gain nothing from threads; on a busy 2-core runner OpenMP spin-waits made them 50x slower, and
    # runs compared bit for bit must use the same thread count.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture
def single_thread():
    """one_intra_op_thread for the test (use with pytest.mark.usefixtures)."""
    with one_intra_op_thread():
        yield


@pytest.fixture(scope="module")
def module_single_thread():
    """one_intra_op_thread for a whole module, its module fixtures included (pytestmark = usefixtures(...))."""
    with one_intra_op_thread():
        yield


# metrics.jsonl fields that measure time, not the run: runs compared row for row leave them out.
TIMING_KEYS = ("seconds", "pairs_per_s", "checkpoint_s", "checkpoint_mib")


def metrics_rows(out_dir: Path, drop: tuple[str, ...] = TIMING_KEYS) -> list[dict]:
    """A run's metrics.jsonl rows, without the `drop` fields."""
    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in lines]


def assert_same_tensors(a: dict, b: dict) -> None:
    """Two state dicts hold the same keys and bit-identical tensors."""
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def moved_copy(processed_root: Path, where: Path, edit_meta=None) -> Path:
    """A copy of processed_root under where (the same data moved elsewhere), its meta.json edited if asked."""
    copy = shutil.copytree(processed_root, where / "moved")
    if edit_meta:
        meta_path = copy / "CUHK-PEDES" / "meta.json"
        meta = json.loads(meta_path.read_text())
        edit_meta(meta)
        meta_path.write_text(json.dumps(meta))
    return copy
