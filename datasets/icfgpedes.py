"""ICFG-PEDES: `ICFG_PEDES.json` (or `ICFG-PEDES.json`) + `imgs/{train,test}/<4-digit id>/<file>.jpg`."""
from pathlib import Path

from datasets.base import Benchmark, Parsed, parse_benchmark

BENCHMARK = Benchmark(
    name="ICFG-PEDES",
    annotation_names=("ICFG_PEDES.json", "ICFG-PEDES.json"),
    image_key="file_path",
    splits=("train", "test"),  # no val split: training evaluates on test and says so
    captions_per_image=1,
)


def parse(dataset_dir: Path) -> Parsed:
    """Read an ICFG-PEDES folder (either annotation spelling, 1 caption per image) into common records."""
    return parse_benchmark(BENCHMARK, dataset_dir)
