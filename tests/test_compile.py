"""torch.compile: the training forward traces to one graph and equals eager; train.py --compile runs end to end.

The tests use the aot_eager backend: it captures the same Dynamo graph (fullgraph=True fails on any graph
break) and runs AOTAutograd's forward/backward split, without Inductor's C++ code generation, which takes
about 5 minutes for the tiny model on the busy 2-core runner (20 s here). Inductor itself runs in
benchmarks/gpu_checks.sh.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

import train
from clip.config import CLIPConfig
from models.cfine import CFine
from models.config import CFineConfig
from tests.conftest import TINY_TRAIN_FLAGS, random_caption_ids
from tests.tolerance import assert_close, assert_each_close

# aot_eager decomposes some ops, so sums may run in another order: fp32 roundings relative to the largest entry
# (tests/tolerance.py). Measured 0 (bit-equal) under every CPU setting there; the bound is what other orders of the
# same model's sums need (chunked vs whole batch, tests/test_engine_grad_cache.py: 3.1e-6) with a margin.
REL = 1e-5


@pytest.mark.usefixtures("single_thread")
def test_training_forward_compiles_to_one_graph_and_equals_eager():
    torch.manual_seed(0)
    eager = CFine(CFineConfig(clip=CLIPConfig.tiny((64, 32)), num_classes=10)).train()
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    images, tokens, pids = torch.randn(8, 3, 64, 32), random_caption_ids(8), torch.arange(8) % 4
    expected, got = eager(images, tokens, pids), compiled(images, tokens, pids)
    for name in ("image_features", "text_features", "loss"):
        assert_close(getattr(got, name), getattr(expected, name), REL, what=name)
    assert_each_close(got.losses, expected.losses, REL, what="losses")
    expected.loss.backward()
    got.loss.backward()
    # Gradients per parameter; those whose exact value is 0 (a bias before BN) hold the others' rounding noise.
    assert_each_close({name: p.grad for name, p in model.named_parameters() if p.grad is not None},
                      {name: p.grad for name, p in eager.named_parameters() if p.grad is not None}, REL, floor=1e-3,
                      what="grad")
    assert_each_close(dict(model.named_buffers()), dict(eager.named_buffers()), REL, what="buffer")  # BN statistics


@pytest.mark.usefixtures("single_thread")
def test_train_py_with_compile_runs_an_epoch_and_evaluates(processed_root, tmp_path):
    out = tmp_path / "run"
    args = train.parse_args(["--data_root", str(processed_root), "--output_dir", str(out), *TINY_TRAIN_FLAGS,
                             "--epochs", "1", "--compile", "aot_eager"])
    assert train.main(args) == 0
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["epoch"] == 1 and row["R1"] >= 0 and row["checkpoint_s"] > 0 and row["checkpoint_mib"] > 0
    assert (out / "best.pt").samefile(out / "last.pt")  # best.pt: another name of the file, not a second write
