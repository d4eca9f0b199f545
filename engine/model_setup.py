"""The model and caption tokeniser a training run starts from: pretrained or random CLIP, and the text encoder's
image tower and pretrained weights (bert: the image tower alone with BERT from --bert, docs/method.md §9); a resumed
run's own, rebuilt from its checkpoint."""
from __future__ import annotations

import argparse

import clip
from engine import settings as settings_table
from models.cfine import CFine
from models.config import ABLATION_SWITCHES, CFineConfig
from models.text_encoders import TextEncoder, text_encoder_class
from models.tokenization import CaptionTokenizer, caption_tokenizer
from utils.errors import CheckpointError, SettingError


def build_model(settings: argparse.Namespace, num_classes: int) -> CFine:
    """CFine with pretrained CLIP weights (--clip NAME|PATH) or random ones (--clip none), the --text_encoder's image
    tower and pretrained text weights (bert: the image tower alone, unprojected, and BERT from --bert; docs/method.md
    §9), every loss-weight setting and the ablation switches."""
    encoder = text_encoder_class(settings.text_encoder)
    image_size = tuple(settings.image_size)
    pretrained = None
    if settings.clip.lower() == "none":
        clip_config = clip.CLIPConfig.for_arch(settings.clip_arch, image_size)
    else:
        try:
            pretrained, clip_config = clip.load(settings.clip, image_size=image_size)
        except CheckpointError as error:
            raise CheckpointError(f"--clip: {error}") from None
        if any(side % clip_config.vision.patch_size for side in image_size):
            raise SettingError("train.py: error: " + settings_table.image_size_problem(
                list(image_size), clip_config.vision.patch_size, settings.clip))
    source = text_source(settings, encoder)
    text = encoder.load_source(source)
    try:
        config = CFineConfig(clip=encoder.image_tower(clip_config), text_encoder=encoder.name, num_classes=num_classes,
                             loss_weights=loss_weights(settings), margin=settings.margin, **switches(settings),
                             **text.fields)
    except ValueError as error:  # the text encoder's weights do not pair with this image tower
        named = f"--{encoder.source_setting} {source}" if encoder.source_setting else f"--text_encoder {encoder.name}"
        raise SettingError(f"{named}: {error}") from None
    model = CFine(config, text_vocab=text.vocab)
    if pretrained is not None:
        model.load_clip_weights(pretrained)
    if text.weights is not None:
        model.load_text_weights(text.weights)
    return model


def loss_weights(settings: argparse.Namespace) -> dict:
    """Every loss-weight setting's value by its name (models/objectives.py: each names a loss term's weight)."""
    return {s.name: getattr(settings, s.name) for s in settings_table.LOSS_WEIGHTS}


def switches(settings: argparse.Namespace) -> dict[str, bool]:
    """The ablation switches --mgf/--cfr/--fcd ("on"/"off") as CFineConfig's booleans (docs/method.md §5, ablation switches)."""
    return {name: getattr(settings, name) == "on" for name in ABLATION_SWITCHES}


def text_source(settings: argparse.Namespace, encoder: type[TextEncoder]) -> str | None:
    """The setting that names the text encoder's pretrained weights (--bert for bert), or None."""
    return getattr(settings, encoder.source_setting) if encoder.source_setting else None


def run_model(settings: argparse.Namespace, resumed: dict | None, num_classes: int) -> CFine:
    """The resumed run's model rebuilt from its checkpoint's config (weights loaded later), else build_model."""
    if resumed is None:
        return build_model(settings, num_classes)
    return CFine(CFineConfig.from_dict(resumed["config"]), text_vocab=resumed.get("text_vocab"))


def run_tokenizer(settings: argparse.Namespace, resumed: dict | None) -> CaptionTokenizer:
    """The run's caption tokeniser: the checkpoint's (resume), else --text_encoder's (bert: with --bert's vocab.txt)."""
    if resumed is not None:
        return caption_tokenizer(CFineConfig.from_dict(resumed["config"]), resumed.get("text_vocab"))
    encoder = text_encoder_class(settings.text_encoder)
    vocab, fields = encoder.read_source(text_source(settings, encoder))
    # Before the model exists: CFineConfig's defaults, with the fields the text encoder's source sets.
    return encoder.tokenizer({**vars(CFineConfig()), **fields}, vocab)
