"""ONNX files of the retrieval encoders: torch.onnx's torch.export-based exporter (dynamo=True, the default in torch
2.14), a dynamic batch axis, one self-contained file per encoder; run with onnxruntime's CPU provider.

Why the dynamo exporter: it is torch 2.14's default and supported path; the TorchScript-based one (dynamo=False) is
deprecated and cannot translate the stable sort either ("ONNX export of operator Sort, Out parameter is not
supported"). Neither exporter has a translation for aten.sort.stable, which MGF's token selection uses
(models/selection.py: candidates ranked by score, ties to the lower position), so one is given here: ONNX TopK over
the whole axis. ONNX defines TopK's order among equal values: "the element with the lower index will appear first"
(the operator's specification since opset 11), which is exactly a stable sort's order, descending or ascending; the
masked non-candidates (-inf) tie among themselves the same way. tests/test_export.py checks onnxruntime's TopK
against torch's stable sort on rows full of ties. Everything else the encoders use (gathers, the key padding mask,
CLIP's argmax for EOT, BERT's eager attention) the exporter translates itself.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np
import torch

from export.encoders import Encoder
from export.packages import import_optional, version_of

OUTPUT = "features"
WRITING = "--format onnx"
RUNNING = "running an exported ONNX folder"


def stable_sort_translation() -> dict:
    """{aten.sort.stable: its ONNX translation}: TopK with k = the axis' length, largest = descending, sorted."""
    onnxscript = import_optional("onnxscript", WRITING)
    op = onnxscript.opset18

    def sort_stable(self, stable: bool | None = None, dim: int = -1, descending: bool = False):
        length = op.Reshape(op.Gather(op.Shape(self), op.Constant(value_int=dim), axis=0), op.Constant(value_ints=[1]))
        values, indices = op.TopK(self, length, axis=dim, largest=descending, sorted=True)
        return values, indices

    return {torch.ops.aten.sort.stable: sort_stable}


@contextlib.contextmanager
def _quiet_optimizer():
    """onnxscript's optimiser logs a line per multi-output node it does not fold; they say nothing about the result."""
    logger = logging.getLogger("onnxscript.optimizer")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def write_onnx(encoder: Encoder, path: Path) -> dict:
    """Export encoder.module to path (batch axis dynamic, weights inside the file); returns the exporter's facts."""
    import_optional("onnx", WRITING)
    with _quiet_optimizer():
        program = torch.onnx.export(
            encoder.module, (encoder.example,), dynamo=True, verbose=False, input_names=[encoder.input_name],
            output_names=[OUTPUT], dynamic_shapes={encoder.input_name: {0: torch.export.Dim("batch")}},
            custom_translation_table=stable_sort_translation())
    program.save(str(path), external_data=False)  # one file: the ViT-B/16 encoders are well under protobuf's 2 GiB
    opset = next(entry.version for entry in program.model_proto.opset_import if entry.domain in ("", "ai.onnx"))
    return {"opset": opset, "exporter": "torch.onnx.export(dynamo=True)",
            "versions": {name: version_of(name) for name in ("torch", "onnx", "onnxscript", "onnxruntime")}}


def onnx_session(path: Path, threads: int | None = None):
    """An onnxruntime session of an exported file on the CPU provider (threads: intra-op threads, None: its default)."""
    ort = import_optional("onnxruntime", RUNNING)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    if threads is not None:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_runner(path: Path, threads: int | None = None):
    """A function input batch (NumPy or CPU tensor) -> the file's output as a NumPy array."""
    session = onnx_session(path, threads)
    name = session.get_inputs()[0].name

    def run(batch) -> np.ndarray:
        return session.run([OUTPUT], {name: np.ascontiguousarray(np.asarray(batch))})[0]

    return run
