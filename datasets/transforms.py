"""Image loading and transforms: RGB decode and bicubic resize to uint8 in the loader workers; flip and mean/std
normalisation of whole batches on the training device (torchvision.transforms.v2 functional ops).

Batches travel as uint8 (a quarter of float32's bytes, pinned, copied without blocking) and become model inputs
with `to_model_input` on the device; train.py, test.py and search.py all take this path. `ImageTransform` is the
earlier all-in-the-worker float path, kept as the baseline of benchmarks/loader_speed.py and as the independent
reference the tests compare the device path with (the same values, bit for bit).
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

# CLIP's pre-training statistics (the default, matching the backbone) and ImageNet's.
MEAN_STD = {
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


class ImageDecodeError(RuntimeError):
    """An image listed in processed_data could not be read; the message names the file."""


def load_rgb(path: str) -> Image.Image:
    """Open and fully decode an image as RGB (grayscale, palette, RGBA and CMYK are converted)."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode == "P":  # palette images may carry transparency: go through RGBA, as PIL advises
                img = img.convert("RGBA")
            return img.convert("RGB")
    except Exception as err:  # PIL raises many types for broken files; the caller needs the path
        raise ImageDecodeError(f"cannot decode image {path} ({type(err).__name__}: {err}); restore the file and "
                               "re-run `bash data.sh` to re-check every image.") from err


class ImageTransform:
    """PIL RGB image -> normalised float tensor (3, H, W): bicubic resize to (H, W), flip if asked."""

    def __init__(self, image_size: tuple[int, int] = (224, 224), mean_std: str = "clip"):
        check_mean_std(mean_std)
        self.height, self.width = image_size
        mean, std = MEAN_STD[mean_std]
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __call__(self, img: Image.Image, flip: bool = False) -> torch.Tensor:
        """x = (resize_bicubic(img) / 255 - mean) / std, mirrored left-right when `flip`."""
        img = img.resize((self.width, self.height), Image.BICUBIC)
        if flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
        return (pixels.float() / 255.0 - self.mean) / self.std


class ResizeToUint8:
    """PIL RGB image -> uint8 tensor (3, H, W), bicubic resize (PIL's own, through torchvision's functional API)."""

    def __init__(self, image_size: tuple[int, int] = (224, 224)):
        self.size = [int(image_size[0]), int(image_size[1])]

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return TF.pil_to_tensor(TF.resize(img, self.size, interpolation=InterpolationMode.BICUBIC))


def check_mean_std(mean_std: str) -> str:
    """The name itself if it is a known normalisation ('clip' or 'imagenet'), else ValueError."""
    if mean_std not in MEAN_STD:
        raise ValueError(f"mean_std must be one of {list(MEAN_STD)}, got {mean_std!r}")
    return mean_std


def to_model_input(images: torch.Tensor, mean_std: str = "clip", flips: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 batch (B, 3, H, W) on any device -> float32 (x / 255 - mean) / std, mirrored where flips[b] is True.

    No host synchronisation: the flip is a select over the batch, not a Python branch per sample.
    """
    if flips is not None:
        images = torch.where(flips.view(-1, 1, 1, 1), TF.horizontal_flip(images), images)
    mean, std = _statistics(check_mean_std(mean_std), images.device)
    return TF.normalize(images.float().div_(255.0), mean, std)


@functools.lru_cache(maxsize=8)
def _statistics(mean_std: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std as float32 tensors on the device, made once (no host-to-device copy per batch)."""
    mean, std = MEAN_STD[mean_std]
    return torch.tensor(mean, device=device), torch.tensor(std, device=device)
