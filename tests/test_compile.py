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


@pytest.mark.usefixtures("single_thread")
def test_training_forward_compiles_to_one_graph_and_equals_eager():
    torch.manual_seed(0)
    eager = CFine(CFineConfig(clip=CLIPConfig.tiny((64, 32)), num_classes=10)).train()
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    images, tokens, pids = torch.randn(8, 3, 64, 32), random_caption_ids(8), torch.arange(8) % 4
    expected, got = eager(images, tokens, pids), compiled(images, tokens, pids)
    for name in ("image_features", "text_features", "loss"):
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), rtol=1e-4, atol=1e-4, msg=name)
    assert got.losses.keys() == expected.losses.keys()
    for name in expected.losses:
        torch.testing.assert_close(got.losses[name], expected.losses[name], rtol=1e-4, atol=1e-4, msg=name)
    expected.loss.backward()
    got.loss.backward()
    for (name, a), b in zip(eager.named_parameters(), model.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-4, msg=name)
    for (name, a), b in zip(eager.named_buffers(), model.buffers()):  # BN running statistics
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.usefixtures("single_thread")
def test_train_py_with_compile_runs_an_epoch_and_evaluates(processed_root, tmp_path):
    out = tmp_path / "run"
    args = train.parse_args(["--data_root", str(processed_root), "--output_dir", str(out), *TINY_TRAIN_FLAGS,
                             "--epochs", "1", "--compile", "aot_eager"])
    assert train.main(args) == 0
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["epoch"] == 1 and row["R1"] >= 0 and row["checkpoint_s"] > 0 and row["checkpoint_mib"] > 0
    assert (out / "best.pt").samefile(out / "last.pt")  # best.pt: another name of the file, not a second write
