"""RSTPReid: `data_captions.json` + a flat `imgs/<file>.jpg`."""
from pathlib import Path

from datasets.base import Benchmark, Parsed, parse_benchmark

BENCHMARK = Benchmark(
    name="RSTPReid",
    annotation_names=("data_captions.json",),
    image_key="img_path",
    splits=("train", "val", "test"),
    captions_per_image=2,
    writes_tokens=False,  # RSTPReid records have no `processed_tokens`
)


def parse(dataset_dir: Path) -> Parsed:
    """Read an RSTPReid folder (0-based int ids, 2 captions per image) into common records."""
    return parse_benchmark(BENCHMARK, dataset_dir)
