"""The two modules an export writes: model input -> the retrieval feature of docs/method.md §7, one per modality.

Each wraps a CFine in eval mode and calls only its public methods, so an export computes what test.py and search.py
compute: `retrieval_features(model.encode_images(images))` and `retrieval_features(model.encode_texts(ids))`, the
L2-normalised concatenation of the n BN features (n, D = CFine.feature_shape: [global, lg1, lg2], or [global] alone
with mgf off), n x D wide. The image input is what the model takes (datasets/transforms.py to_model_input: RGB,
resized, x / 255, then (x - mean) / std, float32): the normalisation stays outside the graph, so an exported file is
the model and nothing else, and the caller normalises as export.json's mean and std say.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from datasets.transforms import to_model_input
from models.cfine import CFine, retrieval_features

# Example captions of several lengths (padding in the first ones; the last is cut to the encoder's limit, so no
# padding): the batches an export is traced with and verified on hold both kinds of rows.
EXAMPLE_CAPTIONS = (
    "a woman in a red coat carrying a black bag",
    "a man wearing blue jeans",
    "A young man in a white T-shirt, dark shorts and grey sneakers walks past a shop window with a phone in his "
    "hand, " * 4,
)
EXAMPLE_BATCH = 2  # traced with this many rows; verified on EXAMPLE_BATCH + 1, so the batch axis is seen to vary


class ImageRetrievalEncoder(nn.Module):
    """images (B, 3, H, W) float32, normalised as the model takes them -> retrieval features (B, n x D), unit length."""

    def __init__(self, model: CFine):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return retrieval_features(self.model.encode_images(images))


class TextRetrievalEncoder(nn.Module):
    """token ids (B, L) int64 of the model's tokeniser -> retrieval features (B, n x D), unit length."""

    def __init__(self, model: CFine):
        super().__init__()
        self.model = model

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return retrieval_features(self.model.encode_texts(token_ids))


class Encoder(NamedTuple):
    """One module to export: its role ('image' or 'text'), the module, its input's name and an example batch."""

    role: str
    module: nn.Module
    input_name: str
    example: torch.Tensor


def example_images(model: CFine, mean_std: str, batch: int, seed: int = 0) -> torch.Tensor:
    """A batch of random RGB pixels as the model takes them (to_model_input with the run's mean/std)."""
    height, width = model.config.clip.vision.image_size
    pixels = torch.randint(0, 256, (batch, 3, height, width), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(seed))
    return to_model_input(pixels, mean_std)


def example_token_ids(model: CFine, batch: int) -> torch.Tensor:
    """The model's token ids of the first `batch` example captions (cycled when more are asked for)."""
    return model.tokenize([EXAMPLE_CAPTIONS[i % len(EXAMPLE_CAPTIONS)] for i in range(batch)])


def retrieval_encoders(model: CFine, mean_std: str, batch: int = EXAMPLE_BATCH) -> list[Encoder]:
    """The image and text modules of an eval-mode CFine, each with an example batch of `batch` rows."""
    model.eval()
    return [Encoder("image", ImageRetrievalEncoder(model).eval(), "images", example_images(model, mean_std, batch)),
            Encoder("text", TextRetrievalEncoder(model).eval(), "token_ids", example_token_ids(model, batch))]
