"""Atomic checkpoint files: one dict per checkpoint, written to a temporary file and renamed."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from models.cfine import CFine
from models.config import CFineConfig
from utils.errors import CheckpointError
from utils.files import atomic_write

FORMAT = "cfine-checkpoint-v1"




def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """torch.save(state) atomically; the previous file at path stays valid if saving fails.

    A full disk reaches here as OSError (from the file system) or as RuntimeError (torch.save's own writer
    reports "file write failed"); both get the same message.
    """
    state = {"format": FORMAT, **state}
    try:
        atomic_write(path, lambda f: torch.save(state, f))
    except (OSError, RuntimeError) as error:
        raise CheckpointError(
            f"{path}: could not be written ({error}); the previous checkpoint there, if any, is unchanged. "
            "Free disk space or choose another --output_dir"
        ) from error


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a CFine training checkpoint with torch.load(weights_only=True), with errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # damaged archives raise many different types
        raise CheckpointError(
            f"{path}: cannot be read ({type(error).__name__}); the file is truncated or corrupt. "
            "Use the other checkpoint in the same folder (last.pt / best.pt) or retrain"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not a CFine checkpoint written by train.py (no '{FORMAT}' marker). "
            "To start from CLIP weights use train.py --clip instead"
        )
    return state


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
