"""TorchScript files of the retrieval encoders: torch.jit.trace, frozen, saved with torch.jit.save; torch.jit.load
runs them (in Python or C++ libtorch) without this repository.

Tracing records the ops one example batch runs. The sizes it turns into constants (the tracer warns of each) are
those fixed by the model: image height and width, the patch count, the token length L and MGF's k; the batch size
is read from the input at run time, and the export is verified on a batch of another size (export/write.py).
Freezing inlines the weights the graph uses and drops the rest, so the image encoder's file holds no text tower and
the text encoder's no image tower (a traced module alone keeps every weight of CFine in both files). torch 2.14
marks torch.jit as deprecated (a FutureWarning per call) but runs it; those warnings are silenced here.
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import numpy as np
import torch

from export.encoders import Encoder


@contextlib.contextmanager
def _jit_warnings_silenced():
    """torch.jit's deprecation notices and the tracer's constant-size warnings (see the module docstring)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.jit")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield


def write_torchscript(encoder: Encoder, path: Path) -> dict:
    """Trace encoder.module on its example batch, freeze it and save it to path; returns the exporter's facts."""
    with _jit_warnings_silenced(), torch.no_grad():
        frozen = torch.jit.freeze(torch.jit.trace(encoder.module, (encoder.example,), check_trace=False))
        torch.jit.save(frozen, str(path))
    return {"exporter": "torch.jit.trace + torch.jit.freeze", "versions": {"torch": torch.__version__}}


def torchscript_runner(path: Path):
    """A function input batch (NumPy or CPU tensor) -> the file's output as a NumPy array (torch.jit.load, CPU)."""
    with _jit_warnings_silenced():
        module = torch.jit.load(str(path), map_location="cpu")

    def run(batch) -> np.ndarray:
        with torch.no_grad():
            return module(torch.as_tensor(np.asarray(batch))).numpy()

    return run
