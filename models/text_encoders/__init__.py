"""CFine's text encoders by the name CFineConfig.text_encoder gives (the interface: models/text_encoders/base.py).

This registry is the one place that chooses between them; CFine, its config, the caption tokeniser, the optimiser
groups and train.py's model setup all ask it.
"""
from __future__ import annotations

from .base import PretrainedText, TextEncoder
from .bert import BertTextEncoder
from .clip import ClipTextEncoder

TEXT_ENCODERS: dict[str, type[TextEncoder]] = {encoder.name: encoder for encoder in (ClipTextEncoder, BertTextEncoder)}


def register(encoder: type[TextEncoder]) -> type[TextEncoder]:
    """Add a text encoder under its name (usable as a class decorator); a name already taken is refused."""
    if not encoder.name or not encoder.attribute:
        raise ValueError(f"text encoder {encoder.__name__} needs a name and an attribute")
    if TEXT_ENCODERS.get(encoder.name, encoder) is not encoder:
        raise ValueError(f"text encoder name {encoder.name!r} is taken by {TEXT_ENCODERS[encoder.name].__name__}")
    TEXT_ENCODERS[encoder.name] = encoder
    return encoder


def text_encoder_class(name: str) -> type[TextEncoder]:
    """The text encoder registered under name."""
    try:
        return TEXT_ENCODERS[name]
    except KeyError:
        known = ", ".join(repr(n) for n in TEXT_ENCODERS)
        raise ValueError(f"text_encoder {name!r} is unknown; use one of {known}") from None


__all__ = ["TEXT_ENCODERS", "BertTextEncoder", "ClipTextEncoder", "PretrainedText", "TextEncoder", "register",
           "text_encoder_class"]
