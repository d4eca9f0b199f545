"""Wall time and file sizes of `python -m scripts.export` for a full-size CFine (random weights), per format.

    python -m benchmarks.export_speed                         # CLIP ViT-B/16 CFine (the default CFineConfig), onnx + torchscript
    python -m benchmarks.export_speed --formats torchscript --tmp /scratch

A tiny training run cannot make a ViT-B/16 checkpoint, so one is built: CFine(CFineConfig()) with its random
initial weights, saved with models/checkpoint.py save_checkpoint in the layout train.py writes (model, config,
text_vocab, args with mean_std, epoch). Each format is then exported by the command itself in a fresh process
(what a user waits for: loading the checkpoint, the export, the verification run and the writing), and the table
lists its wall time, its peak resident memory, every file's size and the verification errors. Temporary files are
deleted at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from models import CFine, CFineConfig
from models.checkpoint import save_checkpoint

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20


def save_random_checkpoint(model: CFine, path: Path, mean_std: str = "clip") -> Path:
    """A checkpoint of the model's current weights in the layout train.py writes (what load_model reads back)."""
    save_checkpoint({"model": model.state_dict(), "config": model.config.to_dict(), "text_vocab": model.text_vocab,
                     "args": {"mean_std": mean_std}, "epoch": 0}, path)
    return path


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", nargs="+", default=["onnx", "torchscript"], choices=["onnx", "torchscript"])
    parser.add_argument("--tmp", default=None, help="folder for the checkpoint and the exports (default: the system's)")
    return parser


def export_once(checkpoint: Path, model_format: str, out: Path) -> dict:
    """Run the export command in a fresh process: its wall time, peak RSS, files and verification errors."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "scripts.export", "--checkpoint", str(checkpoint), "--format",
                              model_format, "--out", str(out)], cwd=REPO, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)  # this child's own peak (ru_maxrss: KiB on Linux)
    seconds = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"export_speed: the {model_format} export failed with exit code {child.returncode}")
    manifest = json.loads((out / "export.json").read_text())
    return {"format": model_format, "seconds": seconds, "peak_rss_mib": usage.ru_maxrss / 1024,
            "files": {name: entry["bytes"] for name, entry in manifest["files"].items()},
            "verified": {k: v for k, v in manifest["verified"].items() if k != "batch_size"}}


def main(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="cfine-export-") as tmp:
        model = CFine(CFineConfig())
        print(f"CFine(CFineConfig()): {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
              f"feature {model.feature_shape}, images {tuple(model.config.clip.vision.image_size)}")
        checkpoint = save_random_checkpoint(model, Path(tmp) / "vit_b16_random.pt")
        del model
        print(f"checkpoint {checkpoint.stat().st_size / MIB:.0f} MiB; CPU threads {torch.get_num_threads()}, "
              f"cores {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")
        for model_format in args.formats:
            row = export_once(checkpoint, model_format, Path(tmp) / model_format)
            files = ", ".join(f"{name} {size / MIB:.1f} MiB" for name, size in row["files"].items() if size > MIB)
            errors = ", ".join(f"{role} {error:.1e}" for role, error in row["verified"].items())
            print(f"{model_format:12s} {row['seconds']:7.1f} s  peak RSS {row['peak_rss_mib']:.0f} MiB  {files}  verified: {errors}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
