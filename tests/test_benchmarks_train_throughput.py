"""benchmarks/train_throughput.py --chunk_size: both steps measured in one run, the computed table, the summary line."""
from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.conftest import REPO

SUMMARY = re.compile(r"^peak memory: unchunked (\d+) MiB, chunked (\d+) MiB \((\d+\.\d)x less\); "
                     r"pairs/s: unchunked (\d+\.\d+), chunked (\d+\.\d+)$")


def run(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "benchmarks/train_throughput.py", "--arch", "tiny", *flags], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_chunk_size_compares_both_steps_and_ends_with_the_summary_line():
    done = run("--batch", "8", "--chunk_size", "4", "--steps", "1", "--warmup", "2", "--num_classes", "100")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    match = SUMMARY.match(lines[-1])
    assert match, lines[-1]
    whole, chunked, ratio, whole_rate, chunked_rate = (float(v) for v in match.groups())
    assert whole > 0 and chunked > 0 and whole_rate > 0 and chunked_rate > 0
    # The ratio is of the peaks, printed rounded to whole MiB (and the ratio to 0.1).
    assert (whole - 0.5) / (chunked + 0.5) - 0.05 <= ratio <= (whole + 0.5) / max(chunked - 0.5, 1e-9) + 0.05
    table = [line for line in lines if line.startswith("largest batch (computed) on ")]
    assert [line.split(" on ")[1].split(" GiB")[0] for line in table] == ["8", "16", "24", "80"]
    assert any(line.startswith("whole-batch phase alone (measured): batch 8: ") for line in lines)


def test_a_chunk_larger_than_the_batch_is_refused():
    done = run("--batch", "8", "--chunk_size", "9")
    assert done.returncode != 0 and "--chunk_size 9: give 1 to --batch (8)" in done.stderr
