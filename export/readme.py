"""README.md of an exported folder: export.json's facts for a person, and how to run the encoders without this
repository (onnxruntime or torch.jit.load). Rendered from the manifest (before its `files` are listed)."""
from __future__ import annotations


def _shape(spec: dict) -> str:
    return "(" + ", ".join(str(axis) for axis in spec["shape"]) + ")"


def _run_snippet(manifest: dict) -> str:
    """Ten lines of Python that encode one image and one caption with the exported files."""
    image, text = manifest["encoders"]["image"], manifest["encoders"]["text"]
    height, width = manifest["image"]["size"]
    if manifest["model_format"] == "onnx":
        load = "import onnxruntime as ort\n" + "".join(
            f"{role} = ort.InferenceSession(\"{spec['file']}\", providers=[\"CPUExecutionProvider\"])\n"
            for role, spec in (("image", image), ("text", text)))
        run_image = f"image.run(None, {{\"{image['inputs'][0]['name']}\": x}})[0]"
        run_text = f"text.run(None, {{\"{text['inputs'][0]['name']}\": ids}})[0]"
    else:
        load = "import torch\n" + "".join(f"{role} = torch.jit.load(\"{spec['file']}\")\n"
                                          for role, spec in (("image", image), ("text", text)))
        run_image, run_text = "image(torch.from_numpy(x)).numpy()", "text(torch.from_numpy(ids)).numpy()"
    return (
        "```python\n"
        "import numpy as np\nfrom PIL import Image\n" + load +
        f"pixels = np.asarray(Image.open(\"person.jpg\").convert(\"RGB\").resize(({width}, {height}), Image.BICUBIC))\n"
        f"mean, std = np.float32({manifest['image']['mean']}), np.float32({manifest['image']['std']})\n"
        "x = ((pixels.astype(np.float32) / 255 - mean) / std).transpose(2, 0, 1)[None]  # (1, 3, H, W)\n"
        f"ids = ...  # (1, {text['inputs'][0]['shape'][1]}) int64 token ids by the rule under Captions\n"
        f"score = float({run_image}[0] @ {run_text}[0])  # cosine similarity\n"
        "```\n")


def readme_text(manifest: dict) -> str:
    """The folder's README.md."""
    image, text, feature = manifest["image"], manifest["text"], manifest["feature"]
    tokenizer, checkpoint, verified = text["tokenizer"], manifest["checkpoint"], manifest["verified"]
    lines = [
        f"# CFine encoders ({manifest['model_format']})", "",
        f"Exported from `{checkpoint['path']}` (SHA256 `{checkpoint['sha256']}`, epoch {checkpoint.get('epoch')}) "
        f"with {manifest['exporter']['exporter']}. Each encoder maps its input to the model's retrieval feature: "
        f"{feature['description']}. Rank images for a caption by the dot product of their features (cosine "
        "similarity).", "",
        "| file | input | output |", "| --- | --- | --- |",
    ]
    for role in ("image", "text"):
        spec = manifest["encoders"][role]
        put, out = spec["inputs"][0], spec["outputs"][0]
        lines.append(f"| `{spec['file']}` | `{put['name']}` {put['dtype']} {_shape(put)} | "
                     f"`{out['name']}` {out['dtype']} {_shape(out)} |")
    lines += [
        "", "`batch` is dynamic: any number of rows.", "",
        "## Images", "",
        f"RGB, {image['preprocess']}; mean {image['mean']}, std {image['std']} ({image['mean_std']}'s).", "",
        "## Captions", "",
        f"Text encoder `{text['encoder']}`; tokeniser `{tokenizer['kind']}` from `{tokenizer['file']}`: "
        f"{tokenizer['rule']}", "",
        "## Running", "", _run_snippet(manifest),
        f"Checked at export: on a batch of {verified['batch_size']} rows (the export was traced on another size) "
        f"the files' features are within {verified['image']:.1e} (images) and {verified['text']:.1e} (captions) "
        "of the PyTorch model's, relative to the largest entry.", "",
        "`export.json` holds these facts as JSON, with every file's SHA256.", "",
    ]
    return "\n".join(lines)
