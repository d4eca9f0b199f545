"""CLIP ViT backbone for CFine: model, BPE tokenizer and checkpoint loading (written for this project)."""
from .config import CLIPConfig, TextConfig, VisionConfig
from .loading import CheckpointError, build_model, load
from .model import CLIP, TokenFeatures
from .tokenizer import tokenize

__all__ = ["CLIP", "CLIPConfig", "CheckpointError", "TextConfig", "TokenFeatures", "VisionConfig",
           "build_model", "load", "tokenize"]
