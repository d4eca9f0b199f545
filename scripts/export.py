"""Export a checkpoint's image and text encoders as ONNX or TorchScript files (docs/export.md).

    python -m scripts.export --checkpoint runs/cuhk/best.pt --format onnx --out exported/cuhk_onnx
    python -m scripts.export --checkpoint runs/cuhk/best.pt --format torchscript --out exported/cuhk_ts

DIR receives image_encoder.{onnx,pt} (normalised images -> the retrieval feature), text_encoder.{onnx,pt} (token ids
-> the same feature of the caption), the tokeniser's files, README.md and export.json (inputs, outputs,
preprocessing, tokeniser rules, the source checkpoint and every file's SHA256). The batch axis is dynamic. DIR is
written atomically and a non-empty DIR is replaced only with --overwrite. An ONNX folder can stand in for the
checkpoint in `search.py index --checkpoint DIR`. The work is in export/ (export_folder.py).
"""
from __future__ import annotations

# ruff: noqa: E402 (the arguments are parsed before the heavy imports: see below)
import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # also run as `python scripts/export.py`

FORMATS = ("onnx", "torchscript")  # export/manifest.py MODEL_FORMATS


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Export a CFine checkpoint's encoders (ONNX or TorchScript)")
    parser.add_argument("--checkpoint", required=True, help="best.pt or last.pt written by train.py")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="onnx (needs requirements-export.txt; runs in onnxruntime) or torchscript (torch.jit.load)")
    parser.add_argument("--out", required=True, help="folder to write (created; must be empty unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (kept until the new "
                                                                 "export is complete)")
    return parser


# Run as a script, the arguments are read before the imports below, which load torch: --help and a mistyped
# argument answer at once.
if __name__ == "__main__":
    ARGS = get_args_parser().parse_args()

from export.export_folder import export_checkpoint
from utils.errors import run_main


def main(args: argparse.Namespace) -> int:
    print(export_checkpoint(args.checkpoint, args.format, args.out, overwrite=args.overwrite).summary())
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, ARGS))
