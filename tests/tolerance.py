"""Float comparisons that hold on any CPU: the error is measured against the size of what is compared.

An fp32 sum rounds differently with its summation order, and that order is the BLAS kernel's choice (MKL's
AVX-512 and AVX2 code paths, MKL_CBWR, the thread count, ATen's CPU capability). The rounding error of a
result therefore scales with its magnitude, and an absolute tolerance that passes on one CPU fails on another
wherever values are large (a 1/0.01 temperature scales them by 100). Every bound here is relative:
max|actual - expected| <= rel * scale, the scale being max|expected| unless the caller names a better one.

TOLERANCE_LOG=<file> appends each comparison's measured error (call site, error, bound) as one JSON line:
that is how the bounds in the tests were picked (measured on several CPU settings, then a 10x margin).
"""
from __future__ import annotations

import inspect
import json
import os
from collections.abc import Mapping, Sequence

import pytest
import torch

_HERE = os.path.abspath(__file__)

# ATEN_CPU_CAPABILITY=default on an AVX-512 CPU (a setting the parity runs force, to sum fp32 in ATen's scalar
# order): torch's bf16 CPU attention still packs its operands for AVX-512, then refuses to run ("pack_vnni2 is only
# supported when avx512 is supported"). The tests that run it skip under that forced setting alone.
FORCED_DEFAULT_ON_AVX512 = (os.environ.get("ATEN_CPU_CAPABILITY", "").lower() == "default"
                            and torch.backends.cpu.get_cpu_capability() == "DEFAULT" and torch.cpu._is_avx512_supported())
skip_bf16_attention_if_forced_default = pytest.mark.skipif(
    FORCED_DEFAULT_ON_AVX512, reason="ATEN_CPU_CAPABILITY=default on an AVX-512 CPU: torch's bf16 CPU attention refuses "
    "to run there (pack_vnni2 is only supported when avx512 is supported)")


def _as_tensor(value) -> torch.Tensor:
    """value as a detached tensor (numbers and lists too)."""
    return torch.as_tensor(value).detach()


def max_abs(value) -> float:
    """max |value| over all entries (0.0 for an empty tensor)."""
    value = _as_tensor(value)
    return float(value.abs().max()) if value.numel() else 0.0


def relative_error(actual, expected, scale: float | None = None) -> float:
    """max |actual - expected| / scale, scale defaulting to max |expected|; 0 when equal, inf when a zero scale
    meets a difference. Non-finite entries must match exactly. The difference is taken in float64, so the
    comparison adds no rounding of its own."""
    actual, expected = _as_tensor(actual).double(), _as_tensor(expected).double()
    assert actual.shape == expected.shape, f"shapes differ: {tuple(actual.shape)} vs {tuple(expected.shape)}"
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(actual), finite), "non-finite entries differ"
    assert torch.equal(actual[~finite], expected[~finite]), "non-finite entries differ"
    difference = max_abs(actual[finite] - expected[finite])
    scale = max_abs(expected[finite]) if scale is None else scale
    if difference == 0:
        return 0.0
    return difference / scale if scale > 0 else float("inf")


def _record(error: float, rel: float, scale: float, what: str) -> None:
    """Append one measurement to $TOLERANCE_LOG: the call site outside this file, the error, the bound, the scale."""
    path = os.environ.get("TOLERANCE_LOG")
    if not path:
        return
    frame = next(f for f in inspect.stack()[1:] if os.path.abspath(f.filename) != _HERE)
    site = f"{os.path.basename(frame.filename)}:{frame.lineno}"
    test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
    with open(path, "a") as log:
        record = {"site": site, "test": test, "what": what, "error": error, "rel": rel, "scale": scale}
        log.write(json.dumps(record) + "\n")


def assert_close(actual, expected, rel: float, scale: float | None = None, what: str = "") -> float:
    """Assert max |actual - expected| <= rel * scale (scale: max |expected| unless given); same dtype when both are
    tensors. Returns the measured relative error. A zero scale asks for equality: exact zeros stay exact."""
    if isinstance(actual, torch.Tensor) and isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype, f"{what} dtypes differ: {actual.dtype} vs {expected.dtype}".lstrip()
    error = relative_error(actual, expected, scale)
    _record(error, rel, max_abs(expected) if scale is None else scale, what)
    assert error <= rel, f"{what}: max|actual - expected| is {error:.3g} of the scale, more than {rel:.3g}".lstrip(": ")
    return error


def _paired(actual: Sequence | Mapping, expected: Sequence | Mapping, floor: float):
    """(name, actual, expected, scale) per tensor of two equal-length lists or two dicts with equal keys; the scale
    is max |expected| of that tensor, never less than floor x the largest entry of all."""
    if isinstance(expected, Mapping):
        assert isinstance(actual, Mapping) and actual.keys() == expected.keys(), "keys differ"
        names = list(expected)
        actual, expected = [actual[n] for n in names], [expected[n] for n in names]
    else:
        actual, expected = list(actual), list(expected)
        assert len(actual) == len(expected), f"{len(actual)} tensors vs {len(expected)}"
        names = [str(i) for i in range(len(expected))]
    overall = max(max_abs(e) for e in expected)
    return [(n, a, e, max(max_abs(e), floor * overall)) for n, a, e in zip(names, actual, expected)]


def relative_errors(actual: Sequence | Mapping, expected: Sequence | Mapping, floor: float = 0.0) -> dict[str, float]:
    """relative_error per tensor of two lists (or dicts), with the scales of assert_each_close."""
    return {n: relative_error(a, e, scale) for n, a, e, scale in _paired(actual, expected, floor)}


def assert_each_close(actual: Sequence | Mapping, expected: Sequence | Mapping, rel: float, floor: float = 0.0,
                      what: str = "") -> float:
    """assert_close per tensor of two equal-length lists (or dicts with equal keys), each scaled by its own
    max |expected|, but never by less than floor x the largest entry of all: a tensor whose exact value is 0
    (e.g. the gradient of a bias that a BatchNorm cancels) holds rounding noise of the others' size only.
    Returns the largest relative error."""
    return max((assert_close(a, e, rel, scale, what=f"{what}[{n}]") for n, a, e, scale in _paired(actual, expected, floor)),
               default=0.0)
