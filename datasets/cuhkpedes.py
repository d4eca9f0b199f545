"""CUHK-PEDES: `reid_raw.json` + `imgs/{cam_a,cam_b,CUHK01,CUHK03,Market,test_query,train_query}/`."""
from pathlib import Path

from datasets.base import Benchmark, Parsed, parse_benchmark

BENCHMARK = Benchmark(
    name="CUHK-PEDES",
    annotation_names=("reid_raw.json",),
    image_key="file_path",
    splits=("train", "val", "test"),
    captions_per_image=2,
)


def parse(dataset_dir: Path) -> Parsed:
    """Read a CUHK-PEDES folder (1-based int ids, usually 2 captions per image) into common records."""
    return parse_benchmark(BENCHMARK, dataset_dir)
