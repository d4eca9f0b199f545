"""An exported ONNX folder, run in onnxruntime: what the search feature needs of a model, without building CFine.

    encoders = ExportedEncoders("exported/")            # export.json checked, every file's SHA256 verified
    gallery = encoders.encode_pixels(uint8_batch)       # (B, 3, H, W) RGB at encoders.image_size -> (B, width)
    queries = encoders.encode_captions(["a man in a red coat"])
    scores = queries @ gallery.T                        # cosine similarities

Captions are tokenised by the text encoder's own tokeniser (models/text_encoders/, with the vocabulary the folder
carries), so the ids are those test.py and search.py give the checkpoint; images are normalised by
datasets/transforms.py to_model_input with the checkpoint's mean/std. Only the two ONNX graphs run in onnxruntime.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from datasets.transforms import to_model_input
from export.manifest import MANIFEST, REEXPORT, read_manifest
from export.onnx_file import onnx_runner
from models.text_encoders import text_encoder_class
from models.tokenization import warn_if_truncated
from utils.errors import CheckpointError


class ExportedEncoders:
    """The image and text encoders of an exported ONNX folder (scripts/export.py --format onnx) in onnxruntime."""

    def __init__(self, folder: str | os.PathLike, threads: int | None = None):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        if self.manifest["model_format"] != "onnx":
            raise CheckpointError(f"{self.folder} holds {self.manifest['model_format']} encoders; only an ONNX export "
                                  "runs here (onnxruntime): export with --format onnx, or use the checkpoint")
        image, text = self.manifest["image"], self.manifest["text"]
        self.image_size: tuple[int, int] = tuple(image["size"])
        self.mean_std: str = image["mean_std"]
        self.feature_width: int = self.manifest["feature"]["width"]
        vocab = (self.folder / text["vocab_file"]).read_text(encoding="utf-8") if text.get("vocab_file") else None
        try:
            self.tokenizer = text_encoder_class(text["encoder"]).tokenizer(self.manifest["config"], vocab)
        except (KeyError, ValueError) as error:
            raise CheckpointError(f"{self.folder}: its tokeniser cannot be built from {MANIFEST} ({error}); "
                                  f"{REEXPORT}") from None
        encoders = self.manifest["encoders"]
        self._image = onnx_runner(self.folder / encoders["image"]["file"], threads)
        self._text = onnx_runner(self.folder / encoders["text"]["file"], threads)

    @property
    def max_length(self) -> int:
        """Token ids per caption (77 CLIP, 100 BERT)."""
        return self.tokenizer.max_length

    def encode_images(self, images) -> np.ndarray:
        """Normalised images (B, 3, H, W) float32, as the model takes them -> retrieval features (B, width)."""
        return self._image(np.asarray(images, dtype=np.float32))

    def encode_pixels(self, pixels) -> np.ndarray:
        """RGB pixels (B, 3, H, W) uint8 at image_size (datasets/transforms.py ResizeToUint8) -> (B, width)."""
        return self.encode_images(to_model_input(torch.as_tensor(pixels).cpu(), self.mean_std).numpy())

    def tokenize(self, captions: Sequence[str], warn_truncated: bool = False) -> np.ndarray:
        """Token ids (N, max_length) int64 of the model's tokeniser; over-long captions are cut (warned if asked)."""
        captions = list(captions)
        if warn_truncated:
            warn_if_truncated(captions, self.tokenizer.token_counts(captions), self.max_length)
        return self.tokenizer(captions).numpy()

    def encode_token_ids(self, ids) -> np.ndarray:
        """Token ids (N, max_length) int64 -> retrieval features (N, width)."""
        return self._text(np.asarray(ids, dtype=np.int64))

    def encode_captions(self, captions: Sequence[str], warn_truncated: bool = False) -> np.ndarray:
        """Captions -> retrieval features (N, width): tokenize, then encode_token_ids."""
        return self.encode_token_ids(self.tokenize(captions, warn_truncated))
