"""Exported folders of the tiny models, made once per test session and shared by the test files that read them
(tests/test_export.py, tests/test_retrieval_exported.py): an ONNX export of the tiny model takes ~15-30 s on a busy
2-core runner, a TorchScript one ~2 s. Tests never change these folders: they copy one to damage it."""
from __future__ import annotations

from pathlib import Path

import torch

from benchmarks.export_speed import save_random_checkpoint
from clip.model import CLIPConfig
from export.export_folder import export_checkpoint
from models import CFine, CFineConfig
from models.text_encoders.bert import architecture
from tests.bert_fixtures import tiny_bert_config, tiny_vocab

_MADE: dict[tuple, Path] = {}


def bert_checkpoint(tmp_path_factory) -> Path:
    """A bert-mode CFine on the tiny image tower (64 x 32 images, width 64) with random weights, saved as train.py
    saves checkpoints (the tiny BERT's vocabulary carried as text_vocab, ImageNet mean/std as the authors')."""
    if ("bert",) not in _MADE:
        torch.manual_seed(0)
        config = CFineConfig(clip=CLIPConfig.tiny((64, 32)).vision_only(), text_encoder="bert",
                             bert=architecture(tiny_bert_config().to_dict()), num_classes=32)
        model = CFine(config, text_vocab="\n".join(tiny_vocab()) + "\n")
        path = tmp_path_factory.mktemp("bert_checkpoint") / "best.pt"
        _MADE[("bert",)] = save_random_checkpoint(model, path, mean_std="imagenet")
    return _MADE[("bert",)]


def exported(checkpoint: Path, model_format: str, tmp_path_factory) -> Path:
    """The folder `python -m scripts.export --checkpoint checkpoint --format model_format` writes (made once)."""
    key = (str(checkpoint), model_format)
    if key not in _MADE:
        out = tmp_path_factory.mktemp(f"exported_{model_format}") / "exported"
        export_checkpoint(checkpoint, model_format, out)
        _MADE[key] = out
    return _MADE[key]
