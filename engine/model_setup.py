"""The model and caption tokeniser a training run starts from: pretrained or random CLIP, and in bert mode the image
tower alone with BERT from --bert (docs/method.md §9); a resumed run's own, rebuilt from its checkpoint."""
from __future__ import annotations

import argparse

import clip
from engine import settings as settings_table
from models.cfine import CFine
from models.config import CFineConfig
from models.tokenization import CaptionTokenizer, caption_tokenizer
from utils.errors import CheckpointError, SettingError


def build_model(settings: argparse.Namespace, num_classes: int) -> CFine:
    """CFine with pretrained CLIP weights (--clip NAME|PATH) or random ones (--clip none); in bert mode the
    image tower alone (unprojected) and BERT from --bert (docs/method.md §9)."""
    image_size = tuple(settings.image_size)
    pretrained = None
    if settings.clip.lower() == "none":
        tiny = settings.clip_arch == "tiny"
        clip_config = clip.CLIPConfig.tiny(image_size) if tiny else clip.CLIPConfig.vit_b16(image_size)
    else:
        try:
            pretrained, clip_config = clip.load(settings.clip, image_size=image_size)
        except CheckpointError as error:
            raise CheckpointError(f"--clip: {error}") from None
        if any(side % clip_config.vision.patch_size for side in image_size):
            raise SettingError("train.py: error: " + settings_table.image_size_problem(
                list(image_size), clip_config.vision.patch_size, settings.clip))
    text, bert_weights, text_vocab = {}, None, None
    if settings.text_encoder == "bert":
        bert_weights, text_vocab, text = load_bert_for_training(settings.bert)
        clip_config = clip_config.vision_only()
        if text["bert"].get("hidden_size") != clip_config.vision.width:
            raise SettingError(f"--bert {settings.bert}: hidden size {text['bert'].get('hidden_size')} differs from the "
                               f"image tokens' width {clip_config.vision.width}; docs/method.md §9 pairs BERT-base (768) "
                               "with ViT-B/16 (768)")
    model = CFine(CFineConfig(
        clip=clip_config, num_classes=num_classes, cmpm_weights=tuple(settings.cmpm_weights),
        cmpc_weights=tuple(settings.cmpc_weights), diversity_weight=settings.diversity_weight,
        ranking_weight=settings.ranking_weight, margin=settings.margin, **text), text_vocab=text_vocab)
    if pretrained is not None:
        model.load_clip_weights(pretrained)
    if bert_weights is not None:
        model.bert.load_state_dict(bert_weights.state_dict(), strict=True)
    return model


def load_bert_for_training(folder: str):
    """(pretrained BertModel, vocab.txt's text, CFineConfig's text fields) from a --bert folder."""
    from models.text_encoders.bert import load_pretrained_bert, read_vocabulary  # bert mode only

    weights, architecture = load_pretrained_bert(folder)
    vocab, lower_case = read_vocabulary(folder)
    return weights, vocab, {"text_encoder": "bert", "bert": architecture, "bert_lower_case": lower_case}


def run_model(settings: argparse.Namespace, resumed: dict | None, num_classes: int) -> CFine:
    """The resumed run's model rebuilt from its checkpoint's config (weights loaded later), else build_model."""
    if resumed is None:
        return build_model(settings, num_classes)
    return CFine(CFineConfig.from_dict(resumed["config"]), text_vocab=resumed.get("text_vocab"))


def run_tokenizer(settings: argparse.Namespace, resumed: dict | None) -> CaptionTokenizer:
    """The run's caption tokeniser: the checkpoint's (resume), else --text_encoder's (with --bert's vocab.txt)."""
    if resumed is not None:
        config = CFineConfig.from_dict(resumed["config"])
        return caption_tokenizer(config.text_encoder, resumed.get("text_vocab"), config.bert_lower_case,
                                 config.bert_max_length)
    if settings.text_encoder == "bert":
        from models.text_encoders.bert import read_vocabulary  # bert mode only

        return caption_tokenizer("bert", *read_vocabulary(settings.bert))
    return caption_tokenizer("clip")
