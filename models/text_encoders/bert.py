"""The authors' text encoder (docs/method.md §9): BERT-base through Hugging Face `transformers`, an optional dependency.

Only CFine's `bert` mode imports `transformers` (inside the functions that need it). The model is
`transformers.BertModel` without its pooler (CFine reads the last hidden state, not the pooled output) and with
the eager attention implementation, the only one that returns attention probabilities; those are taken after
attention dropout, as the authors' vendored BERT returned them, so in training the [CLS] row that selects MGF's
words is stochastic (docs/method.md §9). BertTextEncoder (at the end) is its entry in models/text_encoders/.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import nn

from clip.model import CLIP, TokenFeatures
from utils.errors import BertFolderError

from .base import PretrainedText, TextEncoder

if TYPE_CHECKING:
    from models.config import CFineConfig
    from models.tokenization import CaptionTokenizer

REQUIREMENTS = "pip install -r requirements-bert.txt"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
GET_BERT = ("download the public bert-base-uncased release (config.json, vocab.txt and model.safetensors or "
            "pytorch_model.bin, from https://huggingface.co/google-bert/bert-base-uncased) into that folder")


def import_transformers():
    """The `transformers` module, or a one-line error saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise BertFolderError(f"the bert text encoder needs the `transformers` package: {REQUIREMENTS}") from None
    return transformers


def check_bert_folder(folder: str | Path) -> Path:
    """A Hugging Face BERT folder holds config.json, vocab.txt and one weights file; else an error naming the gap."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BertFolderError(f"--bert {folder}: no such folder; {GET_BERT}")
    missing = [name for name in ("config.json", "vocab.txt") if not (folder / name).is_file()]
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        missing.append(" or ".join(WEIGHT_FILES))
    if missing:
        raise BertFolderError(f"--bert {folder}: missing {', '.join(missing)}; {GET_BERT}")
    return folder


def read_lower_case(folder: Path) -> bool:
    """do_lower_case from tokenizer_config.json when the folder has one; True (bert-base-uncased) otherwise."""
    path = folder / "tokenizer_config.json"
    if path.is_file():
        try:
            return bool(json.loads(path.read_text()).get("do_lower_case", True))
        except (OSError, json.JSONDecodeError) as error:
            raise BertFolderError(f"{path}: cannot be read ({error})") from None
    return True


def read_vocabulary(folder: str | Path) -> tuple[str, bool]:
    """(vocab.txt's text, whether WordPiece lower-cases) of a checked --bert folder: what its tokeniser needs."""
    folder = check_bert_folder(folder)
    try:
        vocab = (folder / "vocab.txt").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise BertFolderError(f"{folder / 'vocab.txt'}: cannot be read ({error})") from None
    return vocab, read_lower_case(folder)


def build_bert(config: dict) -> nn.Module:
    """A randomly initialised BertModel (no pooler, eager attention) of the architecture `config` describes."""
    transformers = import_transformers()
    bert_config = transformers.BertConfig.from_dict(dict(config))
    bert_config._attn_implementation = "eager"  # the only implementation that returns attention probabilities
    return transformers.BertModel(bert_config, add_pooling_layer=False)


def load_pretrained_bert(folder: str | Path) -> tuple[nn.Module, dict]:
    """BertModel with the folder's weights (local files only, never a download) and its config as a dict.

    Keys of the public release ('bert.' prefix, the pre-training heads, old gamma/beta names) are mapped by
    transformers; an encoder weight the file lacks is an error, not a silent random initialisation.
    """
    folder = check_bert_folder(folder)
    transformers = import_transformers()
    logging = transformers.utils.logging
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the release's pre-training heads are expected leftovers, not news
    try:
        model, info = transformers.BertModel.from_pretrained(
            str(folder), add_pooling_layer=False, attn_implementation="eager", local_files_only=True,
            output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as error:
        raise BertFolderError(f"--bert {folder}: cannot be loaded ({type(error).__name__}: {error})") from None
    finally:
        logging.set_verbosity(verbosity)
    missing = [key for key in info.get("missing_keys", []) if not key.startswith("pooler.")]
    mismatched = info.get("mismatched_keys", [])
    if missing or mismatched:
        shown = ", ".join(map(str, (missing + list(mismatched))[:5]))
        raise BertFolderError(f"--bert {folder}: the weights file lacks or misshapes BERT weights ({shown}); {GET_BERT}")
    config = model.config.to_dict()
    return model.float(), architecture(config)


def architecture(config: dict) -> dict:
    """The JSON-able BertConfig fields that define the model (what a checkpoint stores to rebuild it)."""
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
            "type_vocab_size", "initializer_range", "layer_norm_eps", "pad_token_id")
    return {key: config[key] for key in keys if key in config}


def bert_token_features(bert: nn.Module, ids: torch.Tensor) -> TokenFeatures:
    """docs/method.md §9 text path: last hidden state (B, L, 768); [CLS] (position 0) row of the last layer's attention
    probabilities after dropout, averaged over heads (B, L); global index 0; padding where the id is 0."""
    padding = ids == 0
    output = bert(input_ids=ids, attention_mask=(~padding).long(), token_type_ids=torch.zeros_like(ids),
                  output_attentions=True, return_dict=True)
    row = output.attentions[-1][:, :, 0].float().mean(dim=1)
    global_index = torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
    return TokenFeatures(output.last_hidden_state, row, global_index, padding)


class BertTextEncoder(TextEncoder):
    """docs/method.md §9: BERT-base (CFine's `bert.*`) beside CLIP's image tower alone, unprojected (D = 768); [CLS]
    is the global token; WordPiece ids (100) from the vocab.txt that checkpoints carry; weights from --bert."""

    name = "bert"
    attribute = "bert"
    source_setting = "bert"

    @classmethod
    def check_config(cls, config: CFineConfig) -> None:
        """The BERT architecture, the image tower alone, and BERT's hidden size equal to the vision width."""
        if config.bert is None:
            raise ValueError("text_encoder 'bert' needs the BERT architecture (config.bert)")
        super().check_config(config)
        if config.bert.get("hidden_size") != config.clip.vision.width:
            raise ValueError(f"BERT's hidden size {config.bert.get('hidden_size')} must equal the image tokens' "
                             f"width {config.clip.vision.width} (docs/method.md §9: both 768)")

    @classmethod
    def tokenizer(cls, options: Mapping[str, Any], vocab: str | None) -> CaptionTokenizer:
        """WordPiece by the authors' rule, from vocab.txt's text (bert_lower_case, bert_max_length)."""
        from .bert_tokenizer import BertCaptionTokenizer  # it imports this module

        if vocab is None:
            raise ValueError("bert mode needs the vocabulary (vocab.txt's text) to tokenise captions")
        return BertCaptionTokenizer(vocab, options["bert_lower_case"], options["bert_max_length"])

    @classmethod
    def read_source(cls, source: str | None) -> tuple[str, dict[str, Any]]:
        """vocab.txt's text and whether WordPiece lower-cases, from the --bert folder."""
        vocab, lower_case = read_vocabulary(source)
        return vocab, {"bert_lower_case": lower_case}

    @classmethod
    def load_source(cls, source: str | None) -> PretrainedText:
        """The --bert folder's weights, vocabulary, architecture and lower-casing."""
        model, bert_architecture = load_pretrained_bert(source)
        vocab, fields = cls.read_source(source)
        return PretrainedText(model.state_dict(), vocab, {"bert": bert_architecture, **fields})

    @classmethod
    def build(cls, config: CFineConfig, clip: CLIP, vocab: str | None) -> nn.Module:
        """A random BertModel of config.bert's architecture; the vocabulary must come along (checkpoints carry it)."""
        if vocab is None:
            raise ValueError("a bert-mode CFine needs its vocabulary (the text of BERT's vocab.txt)")
        return build_bert(config.bert)

    @classmethod
    def encode(cls, module: nn.Module, ids: torch.Tensor) -> TokenFeatures:
        """docs/method.md §9 text path (bert_token_features)."""
        return bert_token_features(module, ids)
