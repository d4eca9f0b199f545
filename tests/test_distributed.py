"""Several processes on CPU (Gloo, 2 ranks): DDP training, global-batch objectives, distributed evaluation, resume.

The gradient maths runs in 2 processes spawned here on a tiny CFine; the user's path runs train.py and
test.py under torchrun, through a small probe script that also saves each rank's final weights.
"""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

import train
from clip.model import CLIPConfig
from datasets.build import EvalData
from engine.grad_cache import forward_backward
from engine.run_log import epoch_table_header
from evaluation.encode import encode_split
from models import CFine, CFineConfig
from models.checkpoint import load_checkpoint
from models.gather import GlobalBatchNorm1d, convert_to_global_bn, gather_batch
from tests.conftest import REPO, TINY_TRAIN_FLAGS, assert_same_tensors, metrics_rows, random_caption_ids
from tests.tolerance import assert_close, assert_each_close
from utils import distributed
from utils.errors import CFineError

pytestmark = pytest.mark.usefixtures("single_thread")

WORLD = 2
LR = 1e-4  # one SGD step at the authors' head learning rate: the update is -LR x the gradient
# Per process batch 8 (global 16 on 2 ranks); eval batches of 4 split the 12 val images over both ranks.
DDP_FLAGS = [*TINY_TRAIN_FLAGS, "--batch_size", "8", "--eval_batch_size", "4"]  # the last --batch_size wins
# fp32 roundings of the split batch (gathers, Gloo's sums, other matrix shapes), relative to the largest entry
# (tests/tolerance.py). Measured at most 2.4e-6 (features) and 3.8e-6 (gradients) over the CPU settings there.
REL = 3e-5
REL_GRAD = 5e-5

PROBE = """
import os, sys
sys.path.insert(0, {repo!r})
import torch
import train
from models.cfine import CFine
from utils import distributed

models, wrap = [], distributed.wrap_ddp
distributed.wrap_ddp = lambda model, device: models.append(model) or wrap(model, device)
forward, calls = CFine.forward, []
def patched(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 3 and os.environ.get("PROBE_FAIL_RANK") == os.environ["RANK"]:
        raise RuntimeError("injected failure on rank " + os.environ["RANK"])
    out = forward(self, *args, **kwargs)
    if len(calls) == 2 and os.environ.get("PROBE_NAN_RANK") == os.environ["RANK"]:
        out.loss = out.loss * float("nan")
    return out
CFine.forward = patched
code = distributed.run(train.main, train.parse_args())
if os.environ.get("PROBE_DUMP"):
    torch.save(models[0].state_dict(), os.path.join(os.environ["PROBE_DUMP"], "rank%s.pt" % os.environ["RANK"]))
sys.exit(code)
"""


# ---------------------------------------------------------------- one process: sharding and the identity case

def test_shards_are_contiguous_whole_batches_covering_each_item_once():
    for length, batch, world in [(12, 4, 2), (13, 4, 2), (3, 4, 2), (0, 4, 3), (100, 7, 8), (25, 1, 4)]:
        shards = [distributed.shard_range(length, batch, rank, world) for rank in range(world)]
        assert [i for shard in shards for i in shard] == list(range(length))
        assert all(shard.start % batch == 0 for shard in shards if len(shard))
        sizes = sorted(-(-len(shard) // batch) for shard in shards)  # batches per rank
        assert sizes[-1] - sizes[0] <= 1


def test_gather_and_global_bn_are_the_identity_in_one_process():
    x = torch.randn(5, 4, requires_grad=True)
    assert gather_batch(x) is x
    bn, global_bn = torch.nn.BatchNorm1d(4), convert_to_global_bn(torch.nn.BatchNorm1d(4))
    assert isinstance(global_bn, GlobalBatchNorm1d) and global_bn.state_dict().keys() == bn.state_dict().keys()
    assert torch.equal(bn(x), global_bn(x)) and torch.equal(bn.running_var, global_bn.running_var)


# ---------------------------------------------------------------- two spawned processes: the gradient maths


def _batch():
    """8 pairs; identities repeat within and across the two halves (positives on both sides of the split)."""
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return images, random_caption_ids(8), torch.tensor([0, 1, 2, 0, 3, 1, 2, 4])


def _model(sync_bn=False, gather_features=False) -> CFine:
    """The set-up of train.py: same seed on every rank, BN conversion and the gather flag before DDP."""
    torch.manual_seed(0)
    model = CFine(CFineConfig(clip=CLIPConfig.tiny(), num_classes=5)).train()
    if sync_bn:
        convert_to_global_bn(model)
    model.head.gather_features = gather_features
    return model


def _step(model, forward, rows, chunk_size=None, steps=1):
    """`steps` SGD steps on batch rows `rows`; of the last: loss, gradients, the updated state and the features.

    chunk_size: by gradient caching (engine/grad_cache.py), through `forward` (the DDP wrapper) as train.py does.
    """
    images, ids, pids = _batch()
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        out = forward_backward(forward, images[rows], ids[rows], pids[rows], precision=contextlib.nullcontext,
                               scale=lambda loss: loss, chunk_size=chunk_size)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR).step()
    return {"loss": out.loss.detach(), "grads": grads, "state": {k: v.clone() for k, v in model.state_dict().items()},
            "features": out.image_features.detach()}


def _eval_data() -> EvalData:
    """6 gallery images in loader batches of 4 (shards of 4 and 2 rows) and 5 queries (one batch: rank 1 gets none)."""
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    loader = DataLoader([{"images": image} for image in images], batch_size=4)  # uint8, as the real gallery
    return EvalData("val", "clip", loader, torch.arange(6) % 3, [], random_caption_ids(5, seed=3), torch.tensor([0, 1, 2, 0, 1]), [])


MODES = {"global": (True, True, None), "local": (False, False, None), "global_chunked": (True, True, 3),
         "local_chunked": (False, False, 3)}  # (sync_bn, gather_features, chunk_size)
# Two steps chunked with the global batch: DDP rebuilds its buckets after the first synchronised backward, so the
# second step is the one that would meet a reduction left unfinished.
STEPS = {"global": 1, "local": 1, "global_chunked": 2, "local_chunked": 1}


def _ddp_worker(rank: int, tmp: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD)
    try:
        rows = slice(rank * 4, rank * 4 + 4)
        # Chunks of 3 on each rank's 4 pairs: 3 + 1, so a chunked backward without sync and the synchronised last.
        for mode, (sync_bn, gather_features, chunk_size) in MODES.items():
            model = _model(sync_bn, gather_features)
            result = _step(model, distributed.wrap_ddp(model, torch.device("cpu")), rows, chunk_size, STEPS[mode])
            result["loss"] = distributed.all_reduce_sum(result["loss"]) / WORLD  # what train.py logs
            torch.save(result, os.path.join(tmp, f"{mode}_rank{rank}.pt"))
        encoded = encode_split(_model(), _eval_data(), torch.device("cpu"), batch_size=8, progress=False)
        torch.save(encoded, os.path.join(tmp, f"eval_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _assert_same_gradients(actual: dict, expected: dict):
    """fp32 agreement per tensor relative to its largest entry, never less than 1e-3 of the largest gradient overall
    (for tensors whose exact gradient is 0, e.g. the MLP bias that BN cancels, and which hold rounding noise only)."""
    assert_each_close(actual, expected, REL_GRAD, floor=1e-3, what="grad")


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("spawned")
    mp.spawn(_ddp_worker, args=(str(tmp),), nprocs=WORLD, join=True)
    return {f"{mode}{rank}": torch.load(tmp / f"{mode}_rank{rank}.pt", weights_only=False)
            for mode in (*MODES, "eval") for rank in range(WORLD)}


@pytest.mark.parametrize("mode", ["global", "global_chunked"])
def test_gather_features_and_sync_bn_equal_one_process_on_the_concatenated_batch(spawned, mode):
    model = _model()
    reference = _step(model, model, slice(0, 8), steps=STEPS[mode])
    for rank in range(WORLD):
        result = spawned[f"{mode}{rank}"]
        assert_close(result["loss"], reference["loss"], REL)
        _assert_same_gradients(result["grads"], reference["grads"])
        # Updated parameters and BN running statistics (global-batch statistics on every rank).
        # Zero-initialised biases are -LR x their gradient after the step: rounding noise of the gradients' size.
        assert_each_close(result["state"], reference["state"], REL, floor=1e-3, what="state")
        assert_close(result["features"], reference["features"][rank * 4:rank * 4 + 4], REL)
    for key, value in spawned[f"{mode}0"]["state"].items():  # the replicas are identical, bit for bit
        assert torch.equal(value, spawned[f"{mode}1"]["state"][key]), key


@pytest.mark.parametrize("mode", ["local", "local_chunked"])
def test_without_gather_each_rank_uses_its_own_batch_and_ddp_averages(spawned, mode):
    halves = []
    for rank in range(WORLD):
        model = _model()
        halves.append(_step(model, model, slice(rank * 4, rank * 4 + 4)))
    mean_grads = {k: (halves[0]["grads"][k] + halves[1]["grads"][k]) / 2 for k in halves[0]["grads"]}
    result = spawned[f"{mode}0"]
    assert_close(result["loss"], (halves[0]["loss"] + halves[1]["loss"]) / 2, REL)
    _assert_same_gradients(result["grads"], mean_grads)
    for key, value in spawned[f"{mode}0"]["grads"].items():
        assert torch.equal(value, spawned[f"{mode}1"]["grads"][key]), key  # DDP's average reached both ranks
    # BN statistics are per rank here (train.py hands rank 0's to every rank before evaluating and saving).
    for rank in range(WORLD):
        state = spawned[f"{mode}{rank}"]["state"]
        for name in ("head.image_bn.running_mean", "head.text_bn.running_var"):
            assert_close(state[name], halves[rank]["state"][name], REL, what=name)
    # The local objectives are a different training signal from the global batch's (the test above can fail).
    model = _model()
    whole = _step(model, model, slice(0, 8))
    with pytest.raises(AssertionError):
        _assert_same_gradients(result["grads"], whole["grads"])


def test_distributed_encoding_is_the_one_process_encoding_on_every_rank(spawned):
    expected = encode_split(_model(), _eval_data(), torch.device("cpu"), batch_size=8, progress=False)
    for rank in range(WORLD):
        encoded = spawned[f"eval{rank}"]
        assert encoded.gallery.shape == (6, 3, 64) and encoded.queries.shape == (5, 3, 64)
        assert torch.equal(encoded.gallery, expected.gallery) and torch.equal(encoded.queries, expected.queries)


# ---------------------------------------------------------------- torchrun: the user's commands

def torchrun(script, *args, env=None, **popen):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
               str(script), *map(str, args)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen)


def finish(process, timeout=240):
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.terminate()  # torchrun passes it on to its workers (they run in their own sessions)
        stdout, stderr = process.communicate(timeout=60)
        pytest.fail(f"no exit within {timeout} s:\n{stdout[-2000:]}\n{stderr[-2000:]}")
    return process.returncode, stdout, stderr


def run_ok(*command, timeout=240):
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, f"{command}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    path = tmp_path_factory.mktemp("probe") / "probe.py"
    path.write_text(PROBE.format(repo=str(REPO)))
    return path


def train_flags(processed_root, out, *extra):
    return ["--data_root", processed_root, "--output_dir", out, *DDP_FLAGS, *extra]


@pytest.fixture(scope="module")
def straight(processed_root, probe, tmp_path_factory):
    """3 epochs on 2 ranks (default flags: local losses, per-rank BN); each rank's final weights saved."""
    out = tmp_path_factory.mktemp("ddp") / "straight"
    out.mkdir()
    code, stdout, stderr = finish(torchrun(probe, *train_flags(processed_root, out, "--epochs", "3"),
                                           env={"PROBE_DUMP": str(out)}))
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    return out, stdout


def test_torchrun_training_keeps_replicas_identical_and_only_rank_0_writes(straight):
    out, stdout = straight
    rank0, rank1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    assert_same_tensors(rank0, rank1)  # parameters and BN running statistics
    last = load_checkpoint(out / "last.pt")
    assert not any(key.startswith("module.") for key in last["model"])
    assert_same_tensors(last["model"], rank0)
    assert last["world_size"] == WORLD
    assert "global batch 16 (8 per process x 2 process(es))" in stdout
    assert stdout.count(epoch_table_header("val")) == 1  # printed by rank 0 only
    assert sum(line.split()[:1] == ["3/3"] for line in stdout.splitlines()) == 1
    assert [r["epoch"] for r in metrics_rows(out)] == [1, 2, 3]
    assert sorted(p.name for p in out.iterdir()) == [
        "best.pt", "config.json", "environment.json", "last.pt", "metrics.jsonl", "rank0.pt", "rank1.pt", "train.log"]
    assert (out / "train.log").read_text().count(epoch_table_header("val")) == 1  # rank 0's console only


def test_distributed_evaluation_equals_one_process_exactly(straight):
    out, _ = straight
    one = ["--checkpoint", out / "last.pt", "--batch_size", "4", "--workers", "0", "--no_progress", "--device", "cpu"]
    # The evaluation inside the 2-rank training run (val) against test.py in one process on its last.pt.
    run_ok(sys.executable, "test.py", *map(str, one), "--split", "val", "--output_dir", str(out / "val_one"))
    single = json.loads((out / "val_one" / "metrics.json").read_text())
    during = metrics_rows(out)[-1]
    assert {k: during[k] for k in single["t2i"]} == single["t2i"]
    assert {k: during[f"i2t_{k}"] for k in single["i2t"]} == single["i2t"]
    # test.py under torchrun against test.py in one process, on the test split.
    run_ok(sys.executable, "test.py", *map(str, one), "--output_dir", str(out / "test_one"))
    code, stdout, stderr = finish(torchrun("test.py", *one, "--output_dir", out / "test_two"))
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    assert stdout.count("text->image [global+lg1+lg2]") == 1
    one_process = json.loads((out / "test_one" / "metrics.json").read_text())
    two_processes = json.loads((out / "test_two" / "metrics.json").read_text())
    assert two_processes == one_process
    assert one_process["t2i"]["num_queries"] == 25  # every caption once: no padding, no duplicates


def test_sigterm_under_torchrun_saves_on_rank_0_and_resumes_exactly(processed_root, probe, straight, tmp_path):
    out = tmp_path / "interrupted"
    process = torchrun(probe, *train_flags(processed_root, out, "--epochs", "3"))
    for line in process.stdout:  # rank 0 prints epoch 1's row after writing its checkpoint
        if line.split()[:1] == ["1/3"]:
            process.send_signal(signal.SIGTERM)  # to torchrun, which forwards it to every rank
            break
    code, _, stderr = finish(process)
    assert code != 0
    assert stderr.count("stopped by SIGTERM") == 1 and "--resume" in stderr
    state = load_checkpoint(out / "last.pt")
    assert state["step_in_epoch"] > 0 and state["epoch"] < 3  # mid-epoch, before the straight run's end
    # Its batches depend on the process count: one process must refuse to continue it.
    with pytest.raises(CFineError, match="saved by 2 process\\(es\\) in the middle of epoch"):
        train.main(train.parse_args(list(map(str, train_flags(processed_root, tmp_path / "one", "--resume",
                                                              out / "last.pt")))))

    # The same flags again with --resume (equal values are no conflict); epochs and the rest come from last.pt.
    code, stdout, stderr = finish(torchrun(probe, *train_flags(processed_root, out, "--resume", out / "last.pt")))
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    assert_same_tensors(load_checkpoint(out / "last.pt")["model"], load_checkpoint(straight[0] / "last.pt")["model"])
    # Every row the same, the interrupted epoch's losses included: its running sums travelled in last.pt.
    assert metrics_rows(out) == metrics_rows(straight[0])


def test_gather_features_sync_bn_and_a_nonfinite_loss_on_one_rank_under_torchrun(processed_root, probe, tmp_path):
    out = tmp_path / "global"
    out.mkdir()
    code, stdout, stderr = finish(torchrun(probe, *train_flags(processed_root, out, "--epochs", "1",
                                                              "--gather_features", "--sync_bn"),
                                           env={"PROBE_DUMP": str(out), "PROBE_NAN_RANK": "1"}))
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    assert stderr.count("non-finite loss, step skipped") == 1  # by every rank (else DDP would hang), told once
    assert "losses on the global batch (--gather_features), BN statistics of the global batch (--sync_bn)" in stdout
    rank0 = torch.load(out / "rank0.pt")
    assert_same_tensors(rank0, torch.load(out / "rank1.pt"))
    assert_same_tensors(load_checkpoint(out / "last.pt")["model"], rank0)
    row = metrics_rows(out)[0]
    assert row["skipped_steps"] == 1
    assert all(torch.isfinite(torch.tensor(v)) for k, v in row.items() if k.startswith("loss"))


def test_a_failing_rank_stops_every_rank_with_its_error(processed_root, probe, tmp_path):
    started = time.monotonic()
    code, stdout, stderr = finish(torchrun(probe, *train_flags(processed_root, tmp_path / "fail", "--epochs", "2"),
                                           env={"PROBE_FAIL_RANK": "1"}), timeout=120)
    elapsed = time.monotonic() - started
    assert code != 0
    assert "RuntimeError: injected failure on rank 1" in stderr and "[rank 1] failed" in stderr
    assert elapsed < 60, f"the run took {elapsed:.0f} s to stop"
