"""The model behind a search index, in either form `--checkpoint` takes: a train.py checkpoint (CFine in PyTorch) or a
folder written by `python -m scripts.export --format onnx` (its two encoders in onnxruntime; no CFine is built).

Both give the same retrieval features (the concatenated feature of docs/method.md §7, within fp32 rounding:
docs/export.md), so an index records which weights encoded it, not which form: a checkpoint's identity is its path and
SHA256; an exported folder's is its path, the SHA256 of its export.json (which lists the SHA256 of every file in the
folder, each verified when the folder is opened) and `exported_from`, the SHA256 of the checkpoint it was exported
from. Two identities are the same model when their weights' SHA256 (exported_from, else sha256) agree: an index built
with best.pt can be queried with best.pt's ONNX export and the other way round, never with another model's.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from datasets.transforms import to_model_input
from export.exported import ExportedEncoders
from export.manifest import MANIFEST, is_export_folder, read_manifest
from models.cfine import retrieval_features
from models.checkpoint import load_model
from models.precision import autocast, resolve_amp
from retrieval.index import FEATURE
from utils.errors import CheckpointError, SettingError
from utils.files import sha256_file


class CheckpointEncoders:
    """A checkpoint's CFine as search uses it: test.py's gallery path (uint8 normalised on the device, autocast as
    --amp says) and query path (fp32), both giving the concatenated retrieval feature in fp32."""

    def __init__(self, path: str | os.PathLike, device: torch.device, amp: str):
        self.model, state = load_model(path, device)
        self.device, self.amp = device, resolve_amp(amp, device)
        self.mean_std = state.get("args", {}).get("mean_std", "clip")
        self.image_size = tuple(self.model.config.clip.vision.image_size)
        self.feature_width = self.model.retrieval_width  # [global, lg1, lg2] (or [global] alone), each D wide

    @property
    def tokenizer(self):
        """The model's caption tokeniser (token_counts, max_length), named as ExportedEncoders names its own."""
        return self.model.tokenizer

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 images (B, 3, H, W) -> retrieval features (B, width) float32 on the device."""
        with autocast(self.device, self.amp):
            images = to_model_input(pixels.to(self.device, non_blocking=True), self.mean_std)
            encoded = self.model.encode_images(images)
        return retrieval_features(encoded.float(), FEATURE)

    @torch.no_grad()
    def encode_captions(self, captions: Sequence[str], warn_truncated: bool = False) -> torch.Tensor:
        """Captions -> retrieval features (N, width) float32 on the device (over-long ones truncated, warned if asked)."""
        tokens = self.model.tokenize(list(captions), warn_truncated=warn_truncated)
        return retrieval_features(self.model.encode_texts(tokens.to(self.device)).float(), FEATURE)


@dataclass
class SearchModel:
    """The encoders of an index's model and the identity the index records of it."""

    encoders: CheckpointEncoders | ExportedEncoders
    identity: dict

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.encoders.image_size)

    @property
    def feature_width(self) -> int:
        return self.encoders.feature_width

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 images (B, 3, H, W) at image_size -> retrieval features (B, width) float32."""
        return torch.as_tensor(self.encoders.encode_pixels(pixels)).float()

    def encode_captions(self, captions: Sequence[str], warn_truncated: bool = False) -> torch.Tensor:
        """Captions -> retrieval features (N, width) float32."""
        return torch.as_tensor(self.encoders.encode_captions(list(captions), warn_truncated=warn_truncated)).float()

    def truncated(self, captions: Sequence[str]) -> list[bool]:
        """Per caption: whether it is longer than the text encoder reads (encode_captions cuts it to that)."""
        tokenizer = self.encoders.tokenizer
        return [count > tokenizer.max_length for count in tokenizer.token_counts(list(captions))]


def _refuse_plain_folder(path: Path) -> None:
    if path.is_dir() and not is_export_folder(path):
        raise CheckpointError(f"--checkpoint {path} is a folder without {MANIFEST}: pass a train.py checkpoint "
                              "(best.pt) or a folder written by `python -m scripts.export --format onnx`")


def model_identity(path: str | os.PathLike) -> dict:
    """What an index records about the model that encoded it (see the module docstring)."""
    path = Path(path)
    _refuse_plain_folder(path)
    if is_export_folder(path):
        manifest = read_manifest(path, verify_files=False)  # the files are verified when the folder is opened
        return {"path": os.path.abspath(path), "sha256": sha256_file(path / MANIFEST),
                "exported_from": manifest["checkpoint"]["sha256"]}
    return {"path": os.path.abspath(path), "sha256": sha256_file(path)}


def load_search_model(path: str | os.PathLike, device: torch.device, amp: str = "auto",
                      identity: dict | None = None) -> SearchModel:
    """The checkpoint's CFine, or the exported ONNX folder's encoders (onnxruntime, CPU; --amp does not apply)."""
    path = Path(path)
    identity = identity or model_identity(path)
    if not is_export_folder(path):
        return SearchModel(CheckpointEncoders(path, device, amp), identity)
    if amp not in ("auto", "off"):
        raise SettingError(f"--amp {amp}: {path} is an exported ONNX folder, which runs in fp32 in onnxruntime; "
                           "leave --amp at auto or pass --amp off")
    if device.type != "cpu":
        print(f"note: {path} is an exported ONNX folder: its encoders run on the CPU (onnxruntime), not on {device}",
              file=sys.stderr)
    return SearchModel(ExportedEncoders(path), identity)
