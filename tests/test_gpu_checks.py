"""benchmarks/gpu_checks.sh's CPU dry run: every step runs at toy sizes and one summary.json gathers them."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO
from tests.tolerance import skip_bf16_attention_if_forced_default


@skip_bf16_attention_if_forced_default  # the dry run trains and measures in bf16 (--amp bf16, the precision step)
def test_cpu_dry_run_writes_one_summary_with_every_step(tmp_path):
    env = {**os.environ, "DEVICE": "cpu", "OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_checks.sh")], env=env, capture_output=True, text=True,
                          timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == {"env": "ok", "data": "ok", "train_eager": "ok", "train_compile": "skipped (COMPILE=off)",
                                "throughput": "ok", "precision": "ok", "sync": "ok", "memory": "ok", "eval": "ok",
                                "checkpoint": "ok"}
    assert summary["throughput"]["train_eager"]["warm_pairs_per_s"] > 0
    assert summary["precision"]["bf16"]["finite"] and summary["precision"]["off"]["grad_cosine_vs_fp32"] > 0.999
    assert set(summary["eval"]["seconds"]) == {"encode_gallery", "encode_queries", "metrics"}
    assert summary["checkpoint"]["one_write_and_link_s"] > 0 and summary["checkpoint"]["mib"] > 0
    assert summary["sync"]["skipped"] and summary["memory"]["skipped"]  # CUDA only
