"""export.json: what an exported folder holds and how to feed it, written last into the folder; read back and checked
(every field used, every file's SHA256) before an exported folder is run.

    {"format": "cfine-export-v1", "model_format": "onnx" | "torchscript",
     "encoders": {"image" | "text": {"file", "inputs": [{name, dtype, shape}], "outputs": [...]}},
     "image": {"size": [H, W], "mean_std", "mean", "std", "preprocess"},
     "text": {"encoder": "clip" | "bert", "vocab_file", "tokenizer": {kind, file, ..., "rule"}},
     "feature": {"width", "parts", "part_width", "description"},
     "config": the checkpoint's CFineConfig, "checkpoint": {"path", "sha256", "content_sha256", "epoch"},
     "exporter": {...}, "verified": {"batch_size", "image", "text"},
     "files": {name: {"sha256", "bytes"}}}

Shapes name the dynamic batch axis "batch". docs/export.md describes every field.
"""
from __future__ import annotations

import json
from pathlib import Path

from utils.errors import CheckpointError
from utils.files import sha256_file

FORMAT = "cfine-export-v1"
MANIFEST = "export.json"
README = "README.md"
MODEL_FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
ROLES = ("image", "text")
REEXPORT = "export it again with `python -m scripts.export --checkpoint CK --format FORMAT --out DIR --overwrite`"


def encoder_file(role: str, model_format: str) -> str:
    """The file name of an encoder: image_encoder.onnx, text_encoder.pt, ..."""
    return f"{role}_encoder{MODEL_FORMATS[model_format]}"


def tensor_spec(name: str, dtype: str, shape: list) -> dict:
    """One input or output: its name, dtype and shape ("batch" for the dynamic axis)."""
    return {"name": name, "dtype": dtype, "shape": shape}


def file_entry(path: Path) -> dict:
    """A file's SHA256 and size, as export.json lists it."""
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def manifest_text(value, indent: str = "") -> str:
    """JSON with one key per line and lists of plain values on one line (shapes, mean, std stay readable)."""
    inner = indent + "  "
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(str(key))}: {manifest_text(item, inner)}" for key, item in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(value, list) and any(isinstance(item, (dict, list)) for item in value):
        return "[\n" + ",\n".join(inner + manifest_text(item, inner) for item in value) + "\n" + indent + "]"
    return json.dumps(value)


def write_manifest(folder: Path, manifest: dict) -> None:
    """export.json into a folder being filled (utils/files.py replacing_folder makes the folder's swap atomic)."""
    (folder / MANIFEST).write_text(manifest_text(manifest) + "\n", encoding="utf-8")


def _damaged(folder: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"{folder} is not a usable exported folder ({MANIFEST}: {problem}); {REEXPORT}")


def _field(data: dict, key: str, kind: type, folder: Path, where: str = ""):
    value = data.get(key) if isinstance(data, dict) else None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise _damaged(folder, f"{where}{key} is {str(value)[:60]!r}, not a {kind.__name__}")
    return value


def is_export_folder(path: str | Path) -> bool:
    """Whether path is a folder holding export.json (an exported folder, usable or not)."""
    return (Path(path) / MANIFEST).is_file()


def read_manifest(folder: str | Path, verify_files: bool = True) -> dict:
    """export.json of an exported folder with the fields the loader uses checked, and (verify_files) every listed
    file's SHA256 recomputed; CheckpointError naming the folder and what is wrong otherwise."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {MANIFEST}, so it is not an exported folder; "
                              "write one with `python -m scripts.export`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:
        raise _damaged(folder, f"unreadable ({type(error).__name__}: {' '.join(str(error).split())[:200]})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _damaged(folder, f"format is not {FORMAT!r}")
    if manifest.get("model_format") not in MODEL_FORMATS:
        raise _damaged(folder, f"model_format is {str(manifest.get('model_format'))[:40]!r}, not one of "
                               f"{', '.join(MODEL_FORMATS)}")
    files = _field(manifest, "files", dict, folder)
    for name, entry in files.items():
        if Path(name).name != name or not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise _damaged(folder, f"files lists {name[:60]!r} without a SHA256 or outside the folder")
    encoders = _field(manifest, "encoders", dict, folder)
    for role in ROLES:
        encoder = _field(encoders, role, dict, folder, "encoders.")
        if _field(encoder, "file", str, folder, f"encoders.{role}.") not in files:
            raise _damaged(folder, f"encoders.{role}.file is not listed in files")
    image = _field(manifest, "image", dict, folder)
    size = _field(image, "size", list, folder, "image.")
    if len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size):
        raise _damaged(folder, f"image.size is {size!r}, not [height, width]")
    _field(image, "mean_std", str, folder, "image.")
    text = _field(manifest, "text", dict, folder)
    _field(text, "encoder", str, folder, "text.")
    vocab = text.get("vocab_file")
    if vocab is not None and vocab not in files:
        raise _damaged(folder, "text.vocab_file is not listed in files")
    _field(_field(manifest, "feature", dict, folder), "width", int, folder, "feature.")
    _field(manifest, "config", dict, folder)
    _field(_field(manifest, "checkpoint", dict, folder), "sha256", str, folder, "checkpoint.")
    if verify_files:
        check_files(folder, files)
    return manifest


def check_files(folder: Path, files: dict) -> None:
    """Every file export.json lists is there with its recorded SHA256 (one read of each)."""
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing from the exported folder {folder}; {REEXPORT}")
        if sha256_file(path) != entry["sha256"]:
            raise CheckpointError(f"{path} does not match the SHA256 that {folder / MANIFEST} records (it changed or "
                                  f"was damaged after the export); {REEXPORT}")
