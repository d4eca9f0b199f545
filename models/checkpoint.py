"""Atomic checkpoint files: one dict per checkpoint, written to a temporary file and renamed, with a checksum of its
content inside it, verified whenever it is read.

The checksum (key "sha256") is a SHA256 over everything else the dict holds: its structure, every plain value and
every tensor's dtype, shape and bytes. It lives inside the file, so it is replaced in the same rename as the content
(never out of step with it, whatever moment a run is killed), and it stays valid under any name: best.pt is a hard
link to last.pt, and a copied checkpoint keeps it. torch.load reads a file whose stored tensor bytes (or pickled
values) changed after writing without complaint; load_checkpoint refuses it. The cost is one pass of SHA256 over the
tensors at save and at load, spread over up to 8 threads (hashlib releases the GIL): at ViT-B/16 size with Adam's
state (1.86 GiB of random tensors) verifying took 1.8-2.0 s on 2 shared CPU cores, on top of torch.load's 0.8-2.8 s.
Checkpoints written before the checksum load with a note that they are not verified.
"""
from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from models.cfine import CFine
from models.config import CFineConfig
from utils.errors import CheckpointError
from utils.files import atomic_write

FORMAT = "cfine-checkpoint-v1"
DIGEST_KEY = "sha256"  # the content checksum's key; absent from checkpoints written before it


def content_digest(state: Any) -> str:
    """SHA256 (hex) of a checkpoint's content as torch.load(weights_only=True) gives it back: the nesting of dicts
    and lists, each key and plain value, each tensor's dtype, shape and bytes (device, strides and storage sharing
    aside, which loading need not keep). The same before torch.save and after torch.load."""
    tensors: list[torch.Tensor] = []
    digest = hashlib.sha256()
    _feed_structure(state, digest, tensors)
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        for tensor_digest in pool.map(_tensor_digest, tensors):
            digest.update(tensor_digest)
    return digest.hexdigest()


def _feed_structure(value: Any, digest, tensors: list[torch.Tensor]) -> None:
    """Everything but the tensors' bytes into digest (each tensor as its dtype, shape and place in `tensors`)."""
    if isinstance(value, torch.Tensor):
        digest.update(f"T{value.dtype}{tuple(value.shape)}#{len(tensors)};".encode())
        tensors.append(value)
    elif isinstance(value, Mapping):
        digest.update(f"D{len(value)};".encode())
        for key, item in value.items():
            _feed_structure(key, digest, tensors)
            _feed_structure(item, digest, tensors)
    elif isinstance(value, (list, tuple)):  # torch.load gives tuples back as tuples; the digest does not tell them apart
        digest.update(f"L{len(value)};".encode())
        for item in value:
            _feed_structure(item, digest, tensors)
    elif isinstance(value, (str, bytes)):
        data = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value
        digest.update(f"{'S' if isinstance(value, str) else 'B'}{len(data)};".encode())
        digest.update(data)
    elif isinstance(value, float):
        digest.update(f"F{value.hex()};".encode())
    else:  # None, bool, int; torch.dtype and the other types weights_only allows
        digest.update(f"{type(value).__name__}:{value!r};".encode())


def _tensor_digest(tensor: torch.Tensor) -> bytes:
    """SHA256 of a tensor's elements' bytes in row-major order (a host copy first for a GPU tensor)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    if flat.numel() == 0:
        return hashlib.sha256().digest()
    # Contiguous: the elements lie densely from the storage offset on (a one-element tensor may keep any stride).
    flat = torch.as_strided(flat, (flat.numel(),), (1,))
    return hashlib.sha256(flat.view(torch.uint8).numpy()).digest()


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """torch.save(state) atomically, with the checksum of its content; the previous file at path stays valid if
    saving fails.

    A full disk reaches here as OSError (from the file system) or as RuntimeError (torch.save's own writer
    reports "file write failed"); both get the same message.
    """
    state = {"format": FORMAT, **{key: value for key, value in state.items() if key != DIGEST_KEY}}
    state[DIGEST_KEY] = content_digest(state)
    try:
        atomic_write(path, lambda f: torch.save(state, f))
    except (OSError, RuntimeError) as error:
        raise CheckpointError(
            f"{path}: could not be written ({error}); the previous checkpoint there, if any, is unchanged. "
            "Free disk space or choose another --output_dir"
        ) from error


def _what_else(path: str | os.PathLike) -> str:
    """What to use instead of a damaged checkpoint: the run's other one, unless it is the same file (best.pt is a
    hard link to last.pt when the last epoch was the best), which is then damaged too."""
    path = Path(path)
    other = path.with_name({"last.pt": "best.pt", "best.pt": "last.pt"}.get(path.name, "last.pt"))
    try:
        same = other != path and os.path.samefile(path, other)
    except OSError:  # no such file, or path itself unreadable
        return f"Use {other} if it is intact, or retrain" if other.is_file() else "Retrain, or restore a copy"
    if same:
        return (f"{other.name} is the same file here (a hard link: that epoch was the best so far), damaged too: "
                "restore a copy made before the damage, or retrain")
    return f"Use {other} (this run's other checkpoint) if it is intact, or retrain"


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a CFine training checkpoint with torch.load(weights_only=True), with errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # damaged archives raise many different types
        raise CheckpointError(
            f"{path}: cannot be read ({type(error).__name__}); the file is truncated or corrupt. {_what_else(path)}"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not a CFine checkpoint written by train.py (no '{FORMAT}' marker). "
            "To start from CLIP weights use train.py --clip instead"
        )
    verify_content(state, path)
    return state


def verify_content(state: dict[str, Any], path: str | os.PathLike) -> None:
    """CheckpointError unless the loaded state matches the checksum saved in it; a note on stderr for a checkpoint
    written before checkpoints carried one."""
    if DIGEST_KEY not in state:
        print(f"note: {path} carries no checksum (written before checkpoints had one): its content is not verified",
              file=sys.stderr)
        return
    content = {key: value for key, value in state.items() if key != DIGEST_KEY}
    if state[DIGEST_KEY] != content_digest(content):
        raise CheckpointError(
            f"{path}: its content does not match the checksum written with it (it changed after saving: a disk, copy "
            f"or transfer error, or an edit). {_what_else(path)}"
        )


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[CFine, dict[str, Any]]:
    """CFine rebuilt from the config stored in a train.py checkpoint, weights loaded strictly, in eval mode.

    Returns (model, checkpoint dict). Used by test.py and search.py; errors name the file.
    """
    state = load_checkpoint(path)
    try:
        model = CFine(CFineConfig.from_dict(state["config"]), text_vocab=state.get("text_vocab"))
        model.load_state_dict(state["model"], strict=True)
    except (KeyError, ValueError, TypeError, RuntimeError) as error:
        raise CheckpointError(f"{path}: its weights do not match the CFine model it describes ({error})") from None
    return model.to(device).eval(), state
