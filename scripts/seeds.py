"""Train and test one configuration under several seeds, then report mean ± std of the test metrics.

    python -m scripts.seeds --config configs/cuhk_pedes.json --seeds 1 2 3 --out runs/cuhk_seeds
    python -m scripts.seeds --config configs/demo.json --seeds 1 2 3 --out demo_run/seeds -- --data_root demo_run/processed_data

Each seed trains into <out>/seed_<s>/ (train.py, model selected as train.py selects it) and is evaluated on the
test split from its best.pt (test.py). A seed whose evaluation already exists is not run again; one that was
interrupted resumes from its last.pt. The table (<out>/seeds.md) and the raw numbers (<out>/seeds.json) list
every seed and mean ± sample standard deviation (n - 1) of text-to-image R@1, R@5, R@10, mAP and mINP.
Arguments after `--` go to train.py.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # also run as `python scripts/seeds.py`
from utils.errors import CFineError, SettingError, run_main  # noqa: E402
from utils.files import atomic_write, write_json  # noqa: E402

METRICS = ("R1", "R5", "R10", "mAP", "mINP")
HEADERS = {"R1": "R@1", "R5": "R@5", "R10": "R@10", "mAP": "mAP", "mINP": "mINP"}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Several seeds of one config: mean ± std of the test metrics")
    parser.add_argument("--config", required=True, help="a configs/*.json file for train.py")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--out", required=True, help="folder for seed_<s>/ runs, seeds.md and seeds.json")
    parser.add_argument("--split", default="test", choices=["test", "val"], help="split the table reports")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: extra train.py flags")
    return parser


def run(command: list[str]) -> None:
    """Run a step of the pipeline in the repository root; its failure stops everything with its exit code."""
    print("+", " ".join(command), flush=True)
    result = subprocess.run(command, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if result.returncode != 0:
        raise CFineError(f"{Path(sys.argv[0]).stem}: `{' '.join(command)}` failed with exit code {result.returncode}")


def run_seed(config: str, out: Path, seed: int, split: str, extra: list[str]) -> dict:
    """Train (or resume, or reuse) one seed of a config into out/seed_<seed>/ and evaluate its best.pt on split;
    returns test.py's metrics.json."""
    folder = Path(out) / f"seed_{seed}"
    metrics_file = folder / f"eval_{split}" / "metrics.json"
    if metrics_file.is_file():
        print(f"seed {seed}: {metrics_file} exists, reusing it")
        return json.loads(metrics_file.read_text())
    python = sys.executable
    if (folder / "last.pt").is_file():
        run([python, "train.py", "--resume", str(folder / "last.pt"), *extra_for_resume(extra)])
    else:
        run([python, "train.py", "--config", str(config), "--seed", str(seed), "--output_dir", str(folder), *extra])
    run([python, "test.py", "--checkpoint", str(folder / "best.pt"), "--split", split, "--no_progress"])
    return json.loads(metrics_file.read_text())


def extra_for_resume(extra: list[str]) -> list[str]:
    """Flags that also make sense on --resume (where the data lives, how to run), not those defining the run."""
    keep = {"--data_root", "--device", "--workers", "--no_progress"}
    out, i = [], 0
    while i < len(extra):
        flag = extra[i]
        takes_value = i + 1 < len(extra) and not extra[i + 1].startswith("--")
        if flag in keep:
            out += extra[i:i + 2] if takes_value else [flag]
        i += 2 if takes_value else 1
    return out


def train_flags(remainder: list[str]) -> list[str]:
    """The train.py flags given after `--` (argparse.REMAINDER keeps the `--` itself)."""
    return remainder[1:] if remainder[:1] == ["--"] else remainder


def check_seeds(seeds: list[int]) -> None:
    """Each seed once (a repeated seed would be the same run twice, counted twice in the std)."""
    if len(set(seeds)) != len(seeds):
        raise SettingError(f"--seeds {' '.join(map(str, seeds))}: each seed once")


def summarise(per_seed: dict[int, dict]) -> dict[str, dict[str, float | None]]:
    """Mean and sample standard deviation (None for one seed: it has none) of each text-to-image metric."""
    summary = {}
    for key in METRICS:
        values = [metrics["t2i"][key] for metrics in per_seed.values()]
        summary[key] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None}
    return summary


def mean_std(summary: dict[str, float | None]) -> str:
    """'mean ± std' to two decimals; the mean alone for one seed (a sample std needs two)."""
    if summary["std"] is None:
        return f"{summary['mean']:.2f}"
    return f"{summary['mean']:.2f} ± {summary['std']:.2f}"


def markdown_table(per_seed: dict[int, dict], summary: dict, config: str, split: str) -> str:
    """One row per seed and a mean ± std row, text-to-image, the concatenated [global, lg1, lg2] feature."""
    lines = [f"{config}, {split} split, text-to-image, {len(per_seed)} seeds (mean ± sample std)", "",
             "| seed | " + " | ".join(HEADERS[k] for k in METRICS) + " |",
             "| --- |" + " --- |" * len(METRICS)]
    for seed, metrics in per_seed.items():
        lines.append(f"| {seed} | " + " | ".join(f"{metrics['t2i'][k]:.2f}" for k in METRICS) + " |")
    lines.append("| **mean ± std** | " + " | ".join(f"**{mean_std(summary[k])}**" for k in METRICS) + " |")
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> int:
    check_seeds(args.seeds)
    if not Path(args.config).is_file():
        raise SettingError(f"--config {args.config}: no such file")
    extra = train_flags(args.train_args)
    per_seed = {seed: run_seed(args.config, Path(args.out), seed, args.split, extra) for seed in args.seeds}
    summary = summarise(per_seed)
    table = markdown_table(per_seed, summary, args.config, args.split)
    out = Path(args.out)
    atomic_write(out / "seeds.md", lambda f: f.write(table.encode("utf-8")))
    write_json(out / "seeds.json", {"config": args.config, "split": args.split, "per_seed": per_seed,
                                    "summary": summary})
    print(table)
    print(f"wrote {out / 'seeds.md'} and {out / 'seeds.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, get_args_parser().parse_args()))
