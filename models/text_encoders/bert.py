"""The authors' text encoder (docs/method.md §9): BERT-base through Hugging Face `transformers`, an optional dependency.

Only CFine's `bert` mode imports `transformers` (inside the functions that need it). The model is
`transformers.BertModel` without its pooler (CFine reads the last hidden state, not the pooled output) and with
the eager attention implementation, the only one that returns attention probabilities; those are taken after
attention dropout, as the authors' vendored BERT returned them, so in training the [CLS] row that selects MGF's
words is stochastic (docs/method.md §9). BertTextEncoder (at the end) is its entry in models/text_encoders/.
"""
from __future__ import annotations

import json
import pickle
import re
import zipfile
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


SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # BERT's; [PAD] is id 0, the padding id
DEFAULT_VOCAB_SIZE = 30522  # BertConfig's default: what a config.json without vocab_size means
# config.json fields that size the model: each, where given, a positive integer
CONFIG_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings", "type_vocab_size")
JSON_TYPES = {list: "list", str: "string", int: "number", float: "number", bool: "true/false", type(None): "null"}


def _one_line(error: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (library messages span several), cut to limit characters."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _read_json_object(path: Path, folder: Path) -> dict:
    """A --bert folder's JSON file, which must hold one object; else an error naming it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise BertFolderError(f"--bert {folder}: {path} is nested too deeply to be a BERT file; {GET_BERT}") from None
    except UnicodeDecodeError as error:
        raise BertFolderError(f"--bert {folder}: {path} is not UTF-8 text (byte {error.start}); {GET_BERT}") from None
    except ValueError as error:
        raise BertFolderError(f"--bert {folder}: {path} is not valid JSON ({_one_line(error)}); {GET_BERT}") from None
    except OSError as error:
        raise BertFolderError(f"--bert {folder}: {path} cannot be read ({_one_line(error)})") from None
    if not isinstance(data, dict):
        raise BertFolderError(f"--bert {folder}: {path} is a JSON {JSON_TYPES.get(type(data), type(data).__name__)}, "
                              f"not an object; {GET_BERT}")
    return data


def read_config(folder: Path) -> dict:
    """config.json of a --bert folder: an object whose size fields are positive integers."""
    config = _read_json_object(folder / "config.json", folder)
    for key in CONFIG_SIZES:
        value = config.get(key, 1)
        if type(value) is not int or value < 1:
            raise BertFolderError(f"--bert {folder}: config.json's {key} is {value!r}, not a positive integer; "
                                  f"{GET_BERT}")
    return config


def vocabulary_tokens(text: str) -> list[str]:
    """vocab.txt's tokens as transformers reads them: one a line, the id of each its line number from 0."""
    tokens = text.split("\n")
    if tokens[-1] == "":
        tokens.pop()  # the final newline ends the last line; it starts no token
    return tokens


def vocabulary_problem(text: str) -> str | None:
    """What makes a vocabulary unusable as BERT's (empty, a special token missing, [PAD] not id 0), or None."""
    tokens = vocabulary_tokens(text)
    if not any(token.strip() for token in tokens):
        return "is empty"
    present = [token.strip() for token in tokens]
    missing = [token for token in SPECIAL_TOKENS if token not in present]
    if missing:
        return (f"lacks BERT's special token{'s' if len(missing) > 1 else ''} {', '.join(missing)} (a BERT vocab.txt "
                "has [PAD] on its first line and [UNK], [CLS], [SEP] and [MASK] after it)")
    if present[0] != "[PAD]":
        return f"has [PAD] on line {present.index('[PAD]') + 1}, not on line 1 (id 0 is padding)"
    return None


def _checked_folder(folder: str | Path) -> tuple[Path, dict, str]:
    """(folder, config.json's object, vocab.txt's text) of a --bert folder that passes every check below."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BertFolderError(f"--bert {folder}: no such folder; {GET_BERT}")
    missing = [name for name in ("config.json", "vocab.txt") if not (folder / name).is_file()]
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        missing.append(" or ".join(WEIGHT_FILES))
    if missing:
        raise BertFolderError(f"--bert {folder}: missing {', '.join(missing)}; {GET_BERT}")
    config = read_config(folder)
    path = folder / "vocab.txt"
    try:
        vocab = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise BertFolderError(f"--bert {folder}: {path} cannot be read ({_one_line(error)})") from None
    problem = vocabulary_problem(vocab)
    if problem:
        raise BertFolderError(f"--bert {folder}: {path} {problem}, so it is not BERT's vocab.txt; {GET_BERT}")
    size, vocab_size = len(vocabulary_tokens(vocab)), config.get("vocab_size", DEFAULT_VOCAB_SIZE)
    if size > vocab_size:
        raise BertFolderError(
            f"--bert {folder}: {path} has {size} tokens but config.json's vocab_size is {vocab_size}, so ids from "
            f"{vocab_size} on have no embedding; vocab.txt and config.json must come from the same release: {GET_BERT}")
    return folder, config, vocab


def check_bert_folder(folder: str | Path) -> Path:
    """A Hugging Face BERT folder holds config.json (an object), a BERT vocab.txt that fits its vocab_size, and one
    weights file; else an error naming the gap."""
    return _checked_folder(folder)[0]


def read_lower_case(folder: Path) -> bool:
    """do_lower_case from tokenizer_config.json when the folder has one; True (bert-base-uncased) otherwise."""
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return True
    value = _read_json_object(path, folder).get("do_lower_case", True)
    if not isinstance(value, bool):
        raise BertFolderError(f"--bert {folder}: tokenizer_config.json's do_lower_case is {value!r}, not true or "
                              "false; write it as a JSON true/false (or delete the file: bert-base-uncased lower-cases)")
    return value


def read_vocabulary(folder: str | Path) -> tuple[str, bool]:
    """(vocab.txt's text, whether WordPiece lower-cases) of a checked --bert folder: what its tokeniser needs."""
    folder, _, vocab = _checked_folder(folder)
    return vocab, read_lower_case(folder)


def build_bert(config: dict) -> nn.Module:
    """A randomly initialised BertModel (no pooler, eager attention) of the architecture `config` describes."""
    transformers = import_transformers()
    bert_config = transformers.BertConfig.from_dict(dict(config))
    bert_config._attn_implementation = "eager"  # the only implementation that returns attention probabilities
    return transformers.BertModel(bert_config, add_pooling_layer=False)


def weights_file(folder: Path) -> Path:
    """The weights file transformers loads from a --bert folder: model.safetensors where there is one."""
    return next(folder / name for name in WEIGHT_FILES if (folder / name).is_file())


def _damaged(folder: Path, weights: Path, detail: str) -> BertFolderError:
    return BertFolderError(f"--bert {folder}: {weights} is damaged or truncated ({detail}); {GET_BERT}")


def check_weights_file(folder: Path, weights: Path) -> None:
    """A weights file that cannot be whole is refused before transformers reads it: safetensors' header must cover
    the file; a zip-format pytorch_model.bin must end with its central directory (the part a truncation loses)."""
    if weights.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(weights), framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError, ValueError) as error:
            raise _damaged(folder, weights, _one_line(error)) from None
        return
    with open(weights, "rb") as handle:
        zip_format = handle.read(4) == b"PK\x03\x04"
    if zip_format and not zipfile.is_zipfile(weights):
        raise _damaged(folder, weights, "its zip archive has no central directory")


def _leftover(key: str) -> bool:
    """Whether a weight that BertModel has no place for is an expected part of a release: the pre-training heads
    (cls.*), the pooler CFine does not use, or the position-ids buffer older transformers saved."""
    name = key.removeprefix("bert.")
    return key.startswith("cls.") or name.startswith("pooler.") or name.endswith("position_ids")


def load_pretrained_bert(folder: str | Path) -> tuple[nn.Module, dict]:
    """BertModel with the folder's weights (local files only, never a download) and its config as a dict.

    Keys of the public release ('bert.' prefix, the pre-training heads, old gamma/beta names) are mapped by
    transformers; loading is strict both ways: an encoder weight the file lacks is an error, not a silent random
    initialisation, and a weight config.json's architecture has no place for (a layer more than it says) is an
    error, not silently dropped.
    """
    folder, config, _ = _checked_folder(folder)
    weights = weights_file(folder)
    check_weights_file(folder, weights)
    transformers = import_transformers()
    logging = transformers.utils.logging
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the release's pre-training heads are expected leftovers, not news
    try:
        model, info = transformers.BertModel.from_pretrained(
            str(folder), add_pooling_layer=False, attn_implementation="eager", local_files_only=True,
            output_loading_info=True)
    except (EOFError, pickle.UnpicklingError) as error:  # a legacy (pickle) pytorch_model.bin, cut short
        raise _damaged(folder, weights, f"{type(error).__name__}: {_one_line(error)}") from None
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as error:
        raise BertFolderError(f"--bert {folder}: {weights.name} cannot be loaded with its config.json "
                              f"({type(error).__name__}: {_one_line(error)}): the file is damaged or truncated, or "
                              f"config.json does not describe it; {GET_BERT}") from None
    finally:
        logging.set_verbosity(verbosity)
    missing = [key for key in info.get("missing_keys", []) if not key.startswith("pooler.")]
    mismatched = info.get("mismatched_keys", [])
    if missing or mismatched:
        shown = ", ".join(map(str, (sorted(missing) + list(mismatched))[:5]))
        raise BertFolderError(f"--bert {folder}: the weights file lacks or misshapes BERT weights ({shown}); {GET_BERT}")
    unexpected = sorted(key for key in info.get("unexpected_keys", []) if not _leftover(key))
    if unexpected:
        layers = {int(m[1]) for key in unexpected if (m := re.search(r"(?:^|\.)encoder\.layer\.(\d+)\.", key))}
        said = config.get("num_hidden_layers", model.config.num_hidden_layers)
        if layers:
            raise BertFolderError(
                f"--bert {folder}: {weights.name} holds {max(layers) + 1} layer(s) but config.json's "
                f"num_hidden_layers is {said}, so loading would silently drop {max(layers) + 1 - said} of them; "
                f"put the config.json that came with these weights in the folder: {GET_BERT}")
        raise BertFolderError(
            f"--bert {folder}: {weights.name} holds weights that config.json's BERT has no place for "
            f"({', '.join(unexpected[:5])}{', ...' if len(unexpected) > 5 else ''}: {len(unexpected)} in all); "
            f"config.json and the weights must come from the same release: {GET_BERT}")
    return model.float(), architecture(model.config.to_dict())


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
        positions = config.bert.get("max_position_embeddings", 512)
        if positions < config.bert_max_length:
            raise ValueError(f"BERT's config.json has max_position_embeddings {positions}, fewer than the "
                             f"{config.bert_max_length} ids per caption (docs/method.md §9); use a BERT release "
                             "with at least that many positions (bert-base-uncased has 512)")

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
        size, vocab_size = len(vocabulary_tokens(vocab)), config.bert.get("vocab_size", DEFAULT_VOCAB_SIZE)
        if size > vocab_size:
            raise BertFolderError(f"the BERT vocabulary has {size} tokens but the BERT architecture's vocab_size is "
                                  f"{vocab_size}, so ids from {vocab_size} on have no embedding; its vocab.txt and "
                                  "config.json came from different releases")
        return build_bert(config.bert)

    @classmethod
    def encode(cls, module: nn.Module, ids: torch.Tensor) -> TokenFeatures:
        """docs/method.md §9 text path (bert_token_features)."""
        return bert_token_features(module, ids)
