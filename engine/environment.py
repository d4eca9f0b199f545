"""environment.json: the software and hardware a run used (Python, torch, CUDA, cuDNN, GPUs, CPU, git, pip freeze)."""
from __future__ import annotations

import functools
import json
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from utils.files import write_json

REPO = Path(__file__).resolve().parents[1]


def _command(*argv: str, cwd: Path = REPO, timeout: float = 120) -> str | None:
    """A command's stdout, or None if it is missing, fails or hangs."""
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout


def git_state(repo: Path = REPO) -> dict:
    """{"commit": HEAD's hash, "dirty": uncommitted changes?}; None values where git or the repository is missing."""
    commit = _command("git", "rev-parse", "HEAD", cwd=repo)
    status = _command("git", "status", "--porcelain", "--untracked-files=no", cwd=repo) if commit else None
    return {"commit": commit.strip() if commit else None, "dirty": bool(status.strip()) if status is not None else None}


def cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str | None:
    """The CPU's "model name" from /proc/cpuinfo, else platform.processor(); None when neither names it."""
    try:
        for line in Path(cpuinfo).read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or None


def cpu_details() -> dict:
    """The CPU model, the instruction set torch's CPU kernels were chosen for (e.g. AVX512) and torch's intra-op
    thread count: what CPU timings and CPU-side numerics depend on."""
    return {"cpu_model": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "intra_op_threads": torch.get_num_threads()}


def machine(device: torch.device) -> dict:
    """Where an evaluation ran: the device (with its GPU's name) and cpu_details()."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"device": str(device), "gpu": gpu, **cpu_details()}


@functools.lru_cache(maxsize=1)
def pip_freeze() -> tuple[str, ...] | None:
    """`python -m pip freeze` of this interpreter (once per process), or None if pip is missing or fails."""
    out = _command(sys.executable, "-m", "pip", "freeze", "--disable-pip-version-check")
    return tuple(out.splitlines()) if out is not None else None


def describe_environment() -> dict:
    """What environment.json records about this process's environment."""
    cuda = torch.cuda.is_available()
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    freeze = pip_freeze()
    return {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "python": sys.version.split()[0], "platform": platform.platform(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": cudnn,
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
            **cpu_details(),
            "git": git_state(), "pip_freeze": list(freeze) if freeze is not None else None}


def environment_records(previous: str | Path | None, **where) -> list[dict]:
    """The JSON list at previous (none when None, missing or unreadable) plus this process's environment (and
    `where`, e.g. the epoch it starts at): what environment.json holds, so that a run resumed on another machine
    keeps both records."""
    records = []
    if previous is not None:
        try:
            records = json.loads(Path(previous).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            records = []
    return (records if isinstance(records, list) else []) + [{**where, **describe_environment()}]


def record_environment(path: str | Path, **where) -> list[dict]:
    """Append this process's environment (environment_records) to the JSON list at path, atomically; returns it."""
    records = environment_records(path, **where)
    write_json(path, records)
    return records
