"""Build CLIP from a state dict and load OpenAI's released checkpoints (TorchScript or plain state dicts)."""
from __future__ import annotations

import json
import math
import os
import re
import urllib.error
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F

from utils.errors import CheckpointError
from utils.files import sha256_file

from .config import CLIPConfig, TextConfig, VisionConfig
from .model import CLIP

_URL = "https://openaipublic.azureedge.net/clip/models/{sha}/{file}"
RELEASED = {  # name -> (sha256, file name); the sha256 is part of OpenAI's published address
    "ViT-B/32": ("40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af", "ViT-B-32.pt"),
    "ViT-B/16": ("5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", "ViT-B-16.pt"),
    "ViT-L/14": ("b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836", "ViT-L-14.pt"),
    "ViT-L/14@336px": ("3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02", "ViT-L-14-336px.pt"),
}
_RESNETS = ("RN50", "RN101", "RN50x4", "RN50x16", "RN50x64")
# Non-weight entries that OpenAI's TorchScript archives carry in their state dict.
_IGNORED_KEYS = ("input_resolution", "context_length", "vocab_size")
# Entries of a checkpoint dict that say which MLP activation its weights were trained with (declared_activation).
_HINT_KEYS = ("quick_gelu", "model_cfg", "model_config", "model_name", "arch")
_OPEN_CLIP_NAME = re.compile(r"^ViT-[A-Za-z]+-\d+")  # open_clip's config names ("ViT-B-16"); OpenAI's use "/"




def default_cache_dir() -> Path:
    """Where released checkpoints are looked up and downloaded: ~/.cache/clip (as OpenAI's package)."""
    return Path(os.path.expanduser("~/.cache/clip"))


def config_from_state_dict(state_dict: dict, image_size: tuple[int, int] | None = None) -> CLIPConfig:
    """Infer the ViT CLIP architecture from tensor shapes; image_size defaults to the checkpoint's own."""
    if any(key.startswith("visual.layer1.") for key in state_dict):
        raise CheckpointError("ResNet CLIP checkpoints are not supported: CFine needs a ViT image encoder (e.g. ViT-B/16)")
    for key in ("visual.conv1.weight", "visual.positional_embedding", "text_projection", "token_embedding.weight",
                "positional_embedding", "ln_final.weight"):
        if key not in state_dict:
            raise CheckpointError(f"not a CLIP ViT state dict: key '{key}' is missing")
    conv = state_dict["visual.conv1.weight"]
    width, patch = conv.shape[0], conv.shape[-1]
    count = state_dict["visual.positional_embedding"].shape[0] - 1
    side = math.isqrt(count)
    if image_size is None and side * side != count:
        raise CheckpointError(f"the image grid of {count} patches is not square: pass image_size=(H, W)")
    text_width = state_dict["ln_final.weight"].shape[0]
    vision = VisionConfig(
        image_size=tuple(image_size) if image_size else (side * patch, side * patch),
        patch_size=patch,
        width=width,
        layers=_count_layers(state_dict, "visual.transformer.resblocks."),
        heads=width // 64,
    )
    text = TextConfig(
        context_length=state_dict["positional_embedding"].shape[0],
        vocab_size=state_dict["token_embedding.weight"].shape[0],
        width=text_width,
        layers=_count_layers(state_dict, "transformer.resblocks."),
        heads=text_width // 64,
    )
    return CLIPConfig(embed_dim=state_dict["text_projection"].shape[1], vision=vision, text=text)


def _count_layers(state_dict: dict, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for key in state_dict if (m := pattern.match(key))}
    return max(indices) + 1 if indices else 0


def resize_positional_embedding(pos: torch.Tensor, new_grid: tuple[int, int]) -> torch.Tensor:
    """Bicubic 2D resize of a square patch grid of positional embeddings; the class token's row is kept.

    A non-square grid (only this project writes those) is accepted unchanged when its token count is the
    requested grid's, and refused otherwise: its layout cannot be inferred from the count alone.
    """
    cls, grid = pos[:1], pos[1:]
    count, side = grid.shape[0], math.isqrt(grid.shape[0])
    if side * side != count:
        if count == new_grid[0] * new_grid[1]:
            return pos
        raise CheckpointError(
            f"its positional embedding has {count} patch positions, not a square grid, so it cannot be resized "
            f"to the {new_grid[0]}x{new_grid[1]} grid of the requested image size; use the size it was trained at"
        )
    if (side, side) == tuple(new_grid):
        return pos
    grid = grid.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], -1).to(pos.dtype)
    return torch.cat([cls, grid], dim=0)


def build_model(state_dict: dict, image_size: tuple[int, int] | None = None, source: str = "state dict") -> CLIP:
    """A strictly-loaded fp32 CLIP from an OpenAI-named state dict, resized to image_size if given."""
    state_dict = {k: v for k, v in state_dict.items() if k not in _IGNORED_KEYS and not k.endswith("attn_mask")}
    try:
        config = config_from_state_dict(state_dict, image_size)
    except CheckpointError as error:
        raise CheckpointError(f"{source}: {error}") from None
    key = "visual.positional_embedding"
    try:
        state_dict[key] = resize_positional_embedding(state_dict[key], config.vision.grid)
    except CheckpointError as error:
        raise CheckpointError(f"{source}: {error}") from None
    model = CLIP(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: does not match the CLIP architecture inferred from it; "
            f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    wrong = [f"{k}: {tuple(state_dict[k].shape)} vs expected {tuple(v.shape)}"
             for k, v in expected.items() if state_dict[k].shape != v.shape]
    if wrong:
        raise CheckpointError(f"{source}: tensors of the wrong shape: {'; '.join(wrong[:5])}")
    model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)
    return model


def read_state_dict(path: str | os.PathLike) -> dict:
    """Read a TorchScript archive (OpenAI's format) or a plain state dict (optionally under 'state_dict'/'model')."""
    path = Path(path)
    return _state_dict_of(path, _read_checkpoint(path))


def _read_checkpoint(path: Path):
    """The checkpoint object as stored: a TorchScript archive's state dict, or what torch.load returns."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        if _is_torchscript(path):
            return torch.jit.load(str(path), map_location="cpu").state_dict()
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for damaged archives
        raise CheckpointError(
            f"{path}: cannot be read ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
            "the file is truncated, corrupt or not a PyTorch checkpoint: download it again"
        ) from None


def _state_dict_of(path: Path, checkpoint) -> dict:
    """The tensors of a checkpoint: nested under 'state_dict'/'model' or not, DDP's 'module.' prefix removed."""
    state_dict = checkpoint
    for nested in ("state_dict", "model"):
        if isinstance(state_dict, dict) and isinstance(state_dict.get(nested), dict):
            state_dict = state_dict[nested]
            break
    if isinstance(state_dict, dict):  # a flat file may carry the activation hints beside its tensors
        state_dict = {k: v for k, v in state_dict.items() if k not in _HINT_KEYS}
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{path}: does not contain a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def declared_activation(path: Path, checkpoint) -> tuple[bool, str] | None:
    """(quick_gelu, where it is said) when the checkpoint or open_clip's config beside it names the MLP
    activation; None when nothing says (OpenAI's archives, bare state dicts: taken as QuickGELU).

    open_clip marks QuickGELU models with `"quick_gelu": true` in their model config (its
    `open_clip_config.json` on the Hugging Face hub) and a `-quickgelu` suffix in their config names;
    a model config without the flag, or a name such as `ViT-B-16`, is GELU.
    """
    if isinstance(checkpoint, dict):
        if isinstance(checkpoint.get("quick_gelu"), bool):
            return checkpoint["quick_gelu"], "its 'quick_gelu' entry"
        for key in ("model_cfg", "model_config"):
            if isinstance(checkpoint.get(key), dict):
                return bool(checkpoint[key].get("quick_gelu", False)), f"its '{key}' (open_clip model config)"
        for key in ("model_name", "arch"):
            name = checkpoint.get(key)
            if isinstance(name, str) and _OPEN_CLIP_NAME.match(name):
                return name.lower().endswith("-quickgelu"), f"its {key} {name!r} (an open_clip config name)"
    config = path.parent / "open_clip_config.json"
    if config.is_file():
        try:
            data = json.loads(config.read_text(encoding="utf-8"))
            model_cfg = data.get("model_cfg", data)
            return bool(model_cfg.get("quick_gelu", False)), f"{config}"
        except (OSError, ValueError, AttributeError) as error:
            raise CheckpointError(f"{config}: unreadable open_clip config beside {path.name} ({error})") from None
    return None


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") or "/code/" in name for name in archive.namelist())




def download(name: str, root: str | os.PathLike | None = None) -> Path:
    """Path of a released checkpoint in root, downloaded (SHA256-checked, atomically) if absent."""
    sha, file = RELEASED[name]
    root = Path(root) if root else default_cache_dir()
    target = root / file
    if target.is_file():
        if sha256_file(target) == sha:
            return target
        problem = f"{target} exists but its SHA256 does not match the release (truncated or corrupt)"
    else:
        problem = f"{target} does not exist"
    url = _URL.format(sha=sha, file=file)
    root.mkdir(parents=True, exist_ok=True)
    try:  # torch.hub writes a temporary file beside target, checks its SHA256, then moves it into place
        torch.hub.download_url_to_file(url, str(target), hash_prefix=sha, progress=True)
    except RuntimeError as error:
        if "invalid hash value" not in str(error):
            raise
        raise CheckpointError(f"{url}: the downloaded file's SHA256 does not match; try again") from None
    except (urllib.error.URLError, OSError) as error:
        raise CheckpointError(
            f"{problem}, and it could not be downloaded from {url} ({error}). "
            f"Download it on a machine with network access and put it at {target}, or pass its path instead of '{name}'"
        ) from None
    return target


def load(name_or_path: str | os.PathLike, device: str | torch.device = "cpu",
         image_size: tuple[int, int] | None = None, download_root: str | os.PathLike | None = None):
    """(model, config) from a released name ('ViT-B/16', ...) or a checkpoint path; fp32, on device."""
    name = str(name_or_path)
    if name in _RESNETS:
        raise CheckpointError(f"{name}: ResNet CLIP models are not supported: CFine needs a ViT (e.g. ViT-B/16)")
    if name in RELEASED:
        path = download(name, download_root)
    elif Path(name).exists():
        path = Path(name)
    else:
        raise CheckpointError(
            f"{name}: neither a file nor a released model name (known: {', '.join(RELEASED)})"
        )
    checkpoint = _read_checkpoint(path)
    declared = declared_activation(path, checkpoint)
    if declared is not None and not declared[0]:
        raise CheckpointError(
            f"{path}: these weights were trained with GELU (so says {declared[1]}), but this CLIP uses QuickGELU, "
            "as OpenAI's released weights do; with GELU weights its features would be wrong. Use OpenAI's weights "
            "(e.g. 'ViT-B/16') or an open_clip '-quickgelu' model's weights"
        )
    model = build_model(_state_dict_of(path, checkpoint), image_size=image_size, source=str(path))
    return model.to(device), model.config
