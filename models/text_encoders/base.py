"""What CFine asks of a text encoder (docs/method.md §1, §9): one class per encoder, chosen by name in the registry of
models/text_encoders/__init__.py.

A text encoder is a class without instances: the weights it trains are one module that CFine holds under the
encoder's `attribute` (so its state-dict keys are `<attribute>.*`), or, for CLIP's own text tower, CFine's CLIP
module. Its class methods say what the rest of the project needs to know:
- before a model exists: the image tower it pairs with, the config it accepts, its caption tokeniser, and what a
  new run reads from its pretrained source (the train.py setting `source_setting` names it);
- on a model's module: building it, token ids -> TokenFeatures for the head, the parameters of its optimiser
  group (trained at lr_text, models/optim.py), and loading its pretrained weights.
The defaults describe an encoder beside CLIP's image tower alone, unprojected (D = the vision width), as BERT is.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Mapping, NamedTuple

import torch
from torch import nn

from clip.model import CLIP, CLIPConfig, TokenFeatures
from models.selection import global_zero_candidates

if TYPE_CHECKING:
    from models.config import CFineConfig
    from models.tokenization import CaptionTokenizer


class PretrainedText(NamedTuple):
    """What a new run's text side starts from: its weights (a state dict of its module), the vocabulary text that
    checkpoints carry, and the CFineConfig fields the source decides."""

    weights: dict[str, torch.Tensor] | None = None
    vocab: str | None = None
    fields: dict[str, Any] = {}


class TextEncoder:
    """A CFine text encoder; a subclass sets `name` and `attribute` and implements tokenizer, build and encode."""

    name: ClassVar[str] = ""  # CFineConfig.text_encoder: the registry's key
    attribute: ClassVar[str] = ""  # the CFine attribute holding its module, i.e. its state-dict prefix
    source_setting: ClassVar[str | None] = None  # the train.py setting naming its pretrained weights, if any

    @classmethod
    def image_tower(cls, clip: CLIPConfig) -> CLIPConfig:
        """The CLIP config of CFine's image side with this encoder: the image tower alone, unprojected."""
        return clip.vision_only()

    @classmethod
    def check_config(cls, config: CFineConfig) -> None:
        """Raise ValueError when config cannot hold this encoder (CFineConfig calls it when it is made)."""
        if config.clip.text is not None or config.clip.embed_dim is not None:
            raise ValueError(f"text_encoder {cls.name!r} uses the image tower alone, unprojected: "
                             "clip=config.vision_only()")

    @classmethod
    def clip_weights(cls, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The weights of a CLIP file that CFine's CLIP module takes: `visual.*` but the projection it lacks."""
        return {k: v for k, v in state.items() if k.startswith("visual.") and k != "visual.proj"}

    @classmethod
    def tokenizer(cls, options: Mapping[str, Any], vocab: str | None) -> CaptionTokenizer:
        """The caption tokeniser, from CFineConfig's fields by name (`options`) and the vocabulary text, if any."""
        raise NotImplementedError

    @classmethod
    def read_source(cls, source: str | None) -> tuple[str | None, dict[str, Any]]:
        """(vocabulary text, CFineConfig fields) that a new run's tokeniser needs, read from the pretrained source."""
        return None, {}

    @classmethod
    def load_source(cls, source: str | None) -> PretrainedText:
        """A new run's pretrained text weights, vocabulary and config fields (default: none, random weights)."""
        vocab, fields = cls.read_source(source)
        return PretrainedText(None, vocab, fields)

    @classmethod
    def build(cls, config: CFineConfig, clip: CLIP, vocab: str | None) -> nn.Module | None:
        """The randomly initialised module CFine holds under `attribute`; None when the weights are inside `clip`."""
        raise NotImplementedError

    @classmethod
    def encode(cls, module: nn.Module, ids: torch.Tensor) -> TokenFeatures:
        """Token ids (B, L) -> tokens (B, L, D), the global token's attention row (B, L), its index (B,), padding."""
        raise NotImplementedError

    @classmethod
    def candidates(cls, text: TokenFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        """MGF's text candidates (B, L) bool and the scores they are ranked by (B, L), docs/method.md §2. Default,
        the authors' BERT (§9): every position, the global token's score multiplied by 0 (it stays a candidate)."""
        return global_zero_candidates(text.global_attention, text.global_index)

    @classmethod
    def parameters(cls, module: nn.Module) -> Iterator[nn.Parameter]:
        """The parameters of its optimiser group (the text encoder's, at lr_text): its whole module by default."""
        return module.parameters()

    @classmethod
    def load_weights(cls, module: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
        """Copy pretrained weights (a state dict of its module, from load_source) into the module, strictly."""
        module.load_state_dict(weights, strict=True)
