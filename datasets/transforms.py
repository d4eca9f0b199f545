"""Image loading and the train/eval transform: RGB, bicubic resize, optional flip, mean/std normalisation."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

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
        if mean_std not in MEAN_STD:
            raise ValueError(f"mean_std must be one of {list(MEAN_STD)}, got {mean_std!r}")
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
