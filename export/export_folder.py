"""`python -m scripts.export`: a checkpoint's two encoders, its tokeniser's files, README.md and export.json, written
into one folder atomically (utils/files.py replacing_folder: a fresh sibling swapped in when everything is written,
so DIR is the complete old or the complete new folder; a failed export leaves it as it was).

Each exported encoder is run once more before the folder is committed, on a batch of another size than the one it
was traced with, and compared with the PyTorch model: the errors are recorded in export.json, and one above
VERIFY_REL refuses the export.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from datasets.transforms import MEAN_STD
from export.encoders import EXAMPLE_BATCH, Encoder, example_images, example_token_ids, retrieval_encoders
from export.manifest import FORMAT, MANIFEST, MODEL_FORMATS, README, encoder_file, file_entry, tensor_spec, write_manifest
from export.onnx_file import OUTPUT, WRITING, onnx_runner, write_onnx
from export.packages import import_optional
from export.readme import readme_text
from export.tokenizer_files import tokenizer_files
from export.torchscript_file import torchscript_runner, write_torchscript
from models.cfine import CFine
from models.checkpoint import DIGEST_KEY, load_model
from utils.errors import CFineError, SettingError
from utils.files import folder_contents, remove_stale, replacing_folder, sha256_file

VERIFY_REL = 1e-4  # max |exported - model| / max |model|; fp32 roundings measure ~1e-6 (docs/export.md)
PARTS = ("global", "lg1", "lg2")  # CFine's features in order (CFine.feature_shape; [global] alone with mgf off)
PACKAGES = {"onnx": ("onnx", "onnxscript", "onnxruntime"), "torchscript": ()}


@dataclass(frozen=True)
class Writer:
    """How one model format is written (encoder, path) -> facts, and run (path) -> batch -> NumPy features."""

    write: Callable[[Encoder, Path], dict]
    runner: Callable[[Path], Callable]


WRITERS = {"onnx": Writer(write_onnx, onnx_runner), "torchscript": Writer(write_torchscript, torchscript_runner)}
assert WRITERS.keys() == MODEL_FORMATS.keys()


def _size(count: int) -> str:
    """A file size for people: bytes, KiB or MiB."""
    return f"{count} B" if count < 1024 else f"{count / 1024:.1f} KiB" if count < 2**20 else f"{count / 2**20:.1f} MiB"


@dataclass
class ExportReport:
    """What an export wrote: the folder, each file's size, the verification errors and the seconds it took."""

    folder: Path
    model_format: str
    sizes: dict[str, int]
    errors: dict[str, float]
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        """The lines scripts/export.py prints."""
        lines = [f"{self.folder}: {self.model_format} encoders exported and checked in {sum(self.seconds.values()):.1f} s"]
        lines += [f"  {name:32s} {_size(size):>10s}" for name, size in self.sizes.items()]
        lines.append("  verified on a batch of another size: max |exported - model| / max |model| = "
                     + ", ".join(f"{role} {error:.1e}" for role, error in self.errors.items()))
        return "\n".join(lines)


def check_output_folder(out: Path, overwrite: bool) -> None:
    """SettingError unless out can become the exported folder: absent, empty, or (with overwrite) a folder to replace;
    never a file or a link."""
    if out.is_symlink():
        raise SettingError(f"--out {out} is a symbolic link; an export is never written through a link: pass the "
                           f"folder itself ({os.path.realpath(out)}) or another --out")
    if out.exists() and not out.is_dir():
        raise SettingError(f"--out {out} is a file, not a folder: pass another --out")
    if folder_contents(out) and not overwrite:
        raise SettingError(f"--out {out} is not empty: pass --overwrite to replace it (it is kept until the new export "
                           "is complete), or another --out")


def _relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected| / max |expected| (the repository's float comparisons, tests/tolerance.py)."""
    if actual.shape != expected.shape:
        return float("inf")
    return float(np.abs(actual.astype(np.float64) - expected).max() / np.abs(expected).max())


def _verification_batches(model: CFine, mean_std: str) -> dict[str, torch.Tensor]:
    """Inputs of EXAMPLE_BATCH + 1 rows, other pixels and captions than the traced ones."""
    return {"image": example_images(model, mean_std, EXAMPLE_BATCH + 1, seed=1),
            "text": example_token_ids(model, EXAMPLE_BATCH + 1)}


def _specs(encoder: Encoder, width: int) -> dict:
    """export.json's inputs and outputs of an encoder: the example's dtype and shape, the batch axis named."""
    dtype = str(encoder.example.dtype).removeprefix("torch.")
    return {"inputs": [tensor_spec(encoder.input_name, dtype, ["batch", *encoder.example.shape[1:]])],
            "outputs": [tensor_spec(OUTPUT, "float32", ["batch", width])]}


def _manifest(model: CFine, state: dict, checkpoint: Path, model_format: str, mean_std: str, encoders: list[Encoder],
              tokenizer_rules: dict, vocab_file: str | None, exporter: dict, errors: dict[str, float]) -> dict:
    """export.json without its `files` (added once every file is written)."""
    count, width = model.feature_shape
    total = model.retrieval_width
    mean, std = MEAN_STD[mean_std]
    height, image_width = model.config.clip.vision.image_size
    return {
        "format": FORMAT, "model_format": model_format,
        "encoders": {e.role: {"file": encoder_file(e.role, model_format), **_specs(e, total)}
                     for e in encoders},
        "image": {"size": [height, image_width], "mean_std": mean_std, "mean": list(mean), "std": list(std),
                  "preprocess": f"resized to {height} x {image_width} (height x width) with PIL's bicubic filter, "
                                "as uint8; then x / 255 and (x - mean) / std per channel, float32, channels first "
                                "(datasets/transforms.py ResizeToUint8 and to_model_input)"},
        "text": {"encoder": model.config.text_encoder, "vocab_file": vocab_file, "tokenizer": tokenizer_rules},
        "feature": {"width": total, "parts": count, "part_width": width,
                    "description": f"the BN features [{', '.join(PARTS[:count])}] of docs/method.md §7, each "
                                   f"{width} wide, concatenated and L2-normalised ({total} wide, unit length)"},
        "config": model.config.to_dict(),
        "checkpoint": {"path": os.path.abspath(checkpoint), "sha256": sha256_file(checkpoint),
                       "content_sha256": state.get(DIGEST_KEY), "epoch": state.get("epoch")},
        "exporter": exporter,
        "verified": {"batch_size": EXAMPLE_BATCH + 1, **errors},
    }


def export_checkpoint(checkpoint: str | os.PathLike, model_format: str, out: str | os.PathLike,
                      overwrite: bool = False) -> ExportReport:
    """Write the checkpoint's encoders in model_format ('onnx' or 'torchscript') into the folder out (see above)."""
    checkpoint, out = Path(checkpoint), Path(out)
    if model_format not in WRITERS:
        raise SettingError(f"--format {model_format!r}: use one of {', '.join(WRITERS)}")
    check_output_folder(out, overwrite)
    for package in PACKAGES[model_format]:
        import_optional(package, WRITING)
    model, state = load_model(checkpoint, "cpu")
    mean_std = state.get("args", {}).get("mean_std", "clip")  # as test.py and search.py normalise
    encoders = retrieval_encoders(model, mean_std)
    checks = _verification_batches(model, mean_std)
    with torch.no_grad():  # the model's own features, before any export touches it
        expected = {e.role: e.module(checks[e.role]).numpy() for e in encoders}
    writer = WRITERS[model_format]
    tokenizer_data, tokenizer_rules = tokenizer_files(model)
    vocab_file = tokenizer_rules["file"] if model.text_vocab is not None else None
    errors, seconds, exporter = {}, {}, {}
    remove_stale(out.parent, of=out.name)  # what a killed export left beside out
    try:
        with replacing_folder(out, sync=True) as folder:
            for encoder in encoders:
                start = time.perf_counter()
                path = folder / encoder_file(encoder.role, model_format)
                exporter = writer.write(encoder, path)
                errors[encoder.role] = _relative_error(writer.runner(path)(checks[encoder.role]),
                                                       expected[encoder.role])
                seconds[encoder.role] = time.perf_counter() - start
                if not errors[encoder.role] <= VERIFY_REL:
                    raise CFineError(
                        f"the exported {encoder.role} encoder's features differ from the model's by "
                        f"{errors[encoder.role]:.2g} of the largest entry (more than {VERIFY_REL:g}) on a batch of "
                        f"{EXAMPLE_BATCH + 1}: nothing was written to {out}; try the other --format and report it")
            for name, data in tokenizer_data.items():
                (folder / name).write_bytes(data)
            manifest = _manifest(model, state, checkpoint, model_format, mean_std, encoders, tokenizer_rules,
                                 vocab_file, exporter, errors)
            (folder / README).write_text(readme_text(manifest), encoding="utf-8")
            manifest["files"] = {p.name: file_entry(p) for p in sorted(folder.iterdir()) if p.name != MANIFEST}
            write_manifest(folder, manifest)
            sizes = {name: entry["bytes"] for name, entry in manifest["files"].items()}
            sizes[MANIFEST] = (folder / MANIFEST).stat().st_size
    except OSError as error:
        raise SettingError(f"--out {out}: could not be written ({error}); the folder there, if any, is unchanged. "
                           "Free disk space or pass another --out") from error
    return ExportReport(out, model_format, sizes, errors, seconds)
