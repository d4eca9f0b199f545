"""Queries/s and peak memory of the exact search (retrieval.ranking.top_k) on memory-mapped fp16 galleries.

    python -m benchmarks.search_speed                      # 10^4, 10^5, 10^6 images x 1536 (CLIP ViT-B/16's 3 x 512)
    python -m benchmarks.search_speed --sizes 10000 100000 --dim 1536 --device cpu

For each size, random unit fp16 features are written to a temporary .npy (under --tmp), as `search.py index`
writes them, and a fresh subprocess per (size, device) opens it as `search.py query` does (np.load with
mmap_mode; on a GPU the gallery is copied to the device once) and times single-sentence searches (batch 1:
the query/serve case) and batches of 16, top 10. Memory is the subprocess's resident-set growth from before
opening the file to the peak: all of it, and without the file-backed pages (the mapped features sit in the
page cache, shared and reclaimable; what remains is what the search allocated). The table ends with the
growth per 10x of gallery size. The temporary files are deleted at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.rank_speed import PeakRSS
from retrieval.ranking import top_k

MIB = 2**20


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10**4, 10**5, 10**6], help="gallery sizes")
    parser.add_argument("--dim", type=int, default=1536, help="feature width (3 x the joint embedding width)")
    parser.add_argument("--device", nargs="+", default=None, help="default: cpu, and cuda when available")
    parser.add_argument("--single", type=int, default=5, help="timed batch-1 searches per size")
    parser.add_argument("--batches", type=int, default=2, help="timed batches of 16 per size")
    parser.add_argument("--top_k", type=int, default=10)
    parser.add_argument("--threads", type=int, nargs="+", default=[1],
                        help="CPU threads of the scan (top_k's cpu_threads; default 1, as search.py uses)")
    parser.add_argument("--tmp", default=None, help="folder for the feature files (default: the system's temp)")
    parser.add_argument("--child", nargs=4, metavar=("FILE", "DEVICE", "THREADS", "SEED"), help=argparse.SUPPRESS)
    return parser


def write_features(path: Path, rows: int, dim: int, seed: int = 0, block: int = 1 << 16) -> None:
    """Random L2-normalised fp16 rows as a .npy, written block by block (never the whole array in memory)."""
    generator = torch.Generator().manual_seed(seed)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(rows, dim))
    for start in range(0, rows, block):
        n = min(block, rows - start)
        out[start:start + n] = torch.nn.functional.normalize(torch.randn(n, dim, generator=generator), dim=1).half().numpy()
    out.flush()
    del out


def child(path: str, device_name: str, threads: int, seed: int, args) -> dict:
    """Open the features as the real index is opened and time searches; runs in its own process."""
    device = torch.device(device_name)
    queries = torch.nn.functional.normalize(torch.randn(16 * args.batches + args.single + 1, args.dim,
                                                        generator=torch.Generator().manual_seed(seed)), dim=1)
    with PeakRSS() as rss:
        features = np.load(path, mmap_mode="c")
        gallery = torch.from_numpy(features).to(device) if device.type != "cpu" else features
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        queries = queries.to(device)

        def timed(batch):
            start = time.perf_counter()
            top_k(batch, gallery, args.top_k, cpu_threads=threads).indices.cpu()
            return time.perf_counter() - start

        first = timed(queries[:1])  # pages the features in (from the page cache when the file was just written)
        single = [timed(queries[1 + i:2 + i]) for i in range(args.single)]
        base = 1 + args.single
        batched = [timed(queries[base + 16 * i:base + 16 * (i + 1)]) for i in range(args.batches)]
    result = {"device": device_name, "size": len(features), "first_s": first, "single_s": statistics.median(single),
              "batch16_qps": 16 / statistics.median(batched), "rss_mib": rss.growth / MIB,
              "anon_mib": rss.anon_growth / MIB, "threads": threads if device.type == "cpu" else "-"}
    if device.type == "cuda":
        result["gpu_mib"] = torch.cuda.max_memory_allocated(device) / MIB
    return result


def main(args) -> int:
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], int(args.child[2]), int(args.child[3]), args)))
        return 0
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    print(f"torch {torch.__version__}, {os.cpu_count()} cpus, {torch.get_num_threads()} threads, dim {args.dim}, "
          f"top {args.top_k}, devices {devices}, load average {os.getloadavg()}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="search_speed_") as tmp:
        for size in args.sizes:
            path = Path(tmp) / f"features_{size}.npy"
            start = time.perf_counter()
            write_features(path, size, args.dim)
            print(f"wrote {path.name}: {path.stat().st_size / 2**30:.2f} GiB in {time.perf_counter() - start:.1f} s",
                  flush=True)
            runs = [(d, t) for d in devices for t in (args.threads if d == "cpu" else [1])]
            for device, threads in runs:
                command = [sys.executable, "-m", "benchmarks.search_speed", "--dim", str(args.dim), "--single",
                           str(args.single), "--batches", str(args.batches), "--top_k", str(args.top_k),
                           "--child", str(path), device, str(threads), str(size)]
                done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
                if done.returncode != 0:
                    raise SystemExit(f"size {size} on {device} failed:\n{done.stderr[-3000:]}")
                rows.append(json.loads(done.stdout.splitlines()[-1]))
                print(format_row(rows[-1]), flush=True)
            path.unlink()
    print_table(rows)
    print(f"load average at the end {os.getloadavg()}")
    return 0


def format_row(r: dict) -> str:
    gpu = f" {r['gpu_mib']:9.0f}" if "gpu_mib" in r else ""
    return (f"{r['device']:>5s} {str(r['threads']):>3s} {r['size']:>9,d} {r['first_s']:8.3f} {r['single_s']:9.3f} {1 / r['single_s']:8.1f} "
            f"{r['batch16_qps']:9.1f} {r['rss_mib']:10.0f} {r['anon_mib']:10.1f}{gpu}")


def print_table(rows: list[dict]) -> None:
    """The results, then per device the ratio of each size's numbers to the previous size's."""
    print(f"\n{'dev':>5s} {'thr':>3s} {'images':>9s} {'first s':>8s} {'s/query':>9s} {'q/s':>8s} {'q/s(x16)':>9s} "
          f"{'RSS MiB':>10s} {'anon MiB':>10s}")
    for r in rows:
        print(format_row(r))
    for device, threads in dict.fromkeys((r["device"], r["threads"]) for r in rows):
        mine = [r for r in rows if (r["device"], r["threads"]) == (device, threads)]
        for small, large in zip(mine, mine[1:]):
            factor = large["size"] / small["size"]
            print(f"{device} ({threads} thr): {small['size']:,} -> {large['size']:,} ({factor:g}x images): time per query "
                  f"x{large['single_s'] / small['single_s']:.2f}, RSS growth x{large['rss_mib'] / max(small['rss_mib'], 1e-9):.2f}, "
                  f"anonymous x{large['anon_mib'] / max(small['anon_mib'], 1e-9):.2f}")


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
