"""Time and peak memory of evaluation.metrics.evaluate_ranking against the full-matrix argsort baseline.

Default size is the ICFG-PEDES test split (19,848 captions x 19,848 images, 1,000 identities); the
similarity comes from synthetic identity-clustered features so the ranks look like a real model's.
Both methods run on the same matrix, interleaved, and must return the same numbers.

    python -m benchmarks.rank_speed                          # full size, CPU
    python -m benchmarks.rank_speed --queries 2000 --gallery 2000 --ids 100 --repeats 2
    python -m benchmarks.rank_speed --device cuda --dtype float16
"""

import argparse
import math
import os
import statistics
import threading
import time

import torch

from evaluation.metrics import evaluate_ranking


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=19848, help="text queries (rows)")
    parser.add_argument("--gallery", type=int, default=19848, help="gallery images (columns)")
    parser.add_argument("--ids", type=int, default=1000, help="identities shared by queries and gallery")
    parser.add_argument("--dim", type=int, default=64, help="synthetic feature width")
    parser.add_argument("--noise", type=float, default=1.45,
                        help="feature noise; 1.45 gives R@1 near 60%% at full size")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of each method")
    parser.add_argument("--chunk_size", "--chunk-size", type=int, default=None, help="evaluate_ranking chunk (default: auto)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--seed", type=int, default=0)
    return parser


def full_sort_metrics(similarity, query_pids, gallery_pids, ks=(1, 5, 10)):
    """Baseline: stable descending argsort of the whole Q x G matrix, gathered matches, cumulative sums."""
    order = torch.argsort(similarity.float(), dim=1, descending=True, stable=True)
    matches = gallery_pids[order] == query_pids[:, None]
    del order
    scored = matches.any(1)
    matches = matches[scored]
    hits = matches.cumsum(1)
    num_pos = hits[:, -1]
    rows, cols = matches.nonzero(as_tuple=True)
    rank = cols + 1
    precision = hits[rows, cols].double() / rank
    ap = torch.zeros(len(matches), dtype=torch.float64, device=matches.device).index_add_(0, rows, precision)
    last = torch.zeros_like(num_pos).scatter_reduce_(0, rows, rank, "amax")
    num_g, num_scored = similarity.shape[1], len(matches)
    sums = {f"R{k}": (hits[:, min(k, num_g) - 1] > 0).sum() for k in ks}
    sums["mAP"] = (ap / num_pos).sum()
    sums["mINP"] = (num_pos / last.double()).sum()
    result = {name: float(total) * 100 / num_scored for name, total in sums.items()}
    result["num_queries"] = num_scored
    result["num_excluded"] = len(scored) - num_scored
    return result


def make_inputs(args):
    """Identity-clustered unit features -> cosine similarity; query i describes image i mod G."""
    gen = torch.Generator().manual_seed(args.seed)
    gallery_pids = torch.randperm(args.gallery, generator=gen) % args.ids
    query_pids = gallery_pids[torch.arange(args.queries) % args.gallery]
    centres = torch.randn(args.ids, args.dim, generator=gen)
    scale = args.noise / math.sqrt(args.dim)

    def features(pids):
        noisy = centres[pids] / centres[pids].norm(dim=1, keepdim=True)
        return torch.nn.functional.normalize(noisy + scale * torch.randn(noisy.shape, generator=gen), dim=1)

    image, text = features(gallery_pids), features(query_pids)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    similarity = (text.to(device) @ image.to(device).T).to(dtype)
    return similarity, query_pids.to(device), gallery_pids.to(device)


class PeakRSS:
    """Peak resident-set growth (bytes) of this process while active, sampled from /proc/self/statm.

    growth counts every resident page; anon_growth leaves out file-backed ones (memory-mapped files
    live in the page cache, shared and reclaimable), so it is the memory the process itself allocated.
    """

    def __init__(self, period_s=0.0005):
        self.period_s = period_s
        self.page = os.sysconf("SC_PAGE_SIZE")

    def rss(self):
        """(resident, resident minus file-backed and shared) bytes."""
        with open("/proc/self/statm") as statm:
            fields = statm.read().split()
        resident, shared = int(fields[1]) * self.page, int(fields[2]) * self.page
        return resident, resident - shared

    def __enter__(self):
        self.start = self.peak = self.rss()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop.is_set():
            self._update()
            time.sleep(self.period_s)

    def _update(self):
        now = self.rss()
        self.peak = tuple(max(p, n) for p, n in zip(self.peak, now))

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self._update()
        self.growth = self.peak[0] - self.start[0]
        self.anon_growth = self.peak[1] - self.start[1]


def measure(fn, similarity, query_pids, gallery_pids, device):
    """(result, seconds, peak extra bytes) of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        result = fn(similarity, query_pids, gallery_pids)
        torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        return result, seconds, torch.cuda.max_memory_allocated(device) - base
    with PeakRSS() as rss:
        start = time.perf_counter()
        result = fn(similarity, query_pids, gallery_pids)
        seconds = time.perf_counter() - start
    return result, seconds, rss.growth


def main(args):
    device = torch.device(args.device)
    print(f"device {device}, dtype {args.dtype}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"cpus {os.cpu_count()}, load average {os.getloadavg()}")
    similarity, query_pids, gallery_pids = make_inputs(args)
    print(f"similarity {tuple(similarity.shape)} ({similarity.numel() * similarity.element_size() / 2**30:.2f} GiB), "
          f"{args.ids} ids")
    methods = {
        "evaluate_ranking": lambda s, q, g: evaluate_ranking(s, q, g, chunk_size=args.chunk_size),
        "full_sort_baseline": full_sort_metrics,
    }
    tiny = make_inputs(argparse.Namespace(**{**vars(args), "queries": 8, "gallery": 8, "ids": 2}))
    for fn in methods.values():
        fn(*tiny)  # first-call set-up (thread pools, allocator) is not what is being compared
    times = {name: [] for name in methods}
    peaks = {name: [] for name in methods}
    results = {}
    for repeat in range(args.repeats):
        names = list(methods) if repeat % 2 == 0 else list(methods)[::-1]
        for name in names:
            result, seconds, peak = measure(methods[name], similarity, query_pids, gallery_pids, device)
            times[name].append(seconds)
            peaks[name].append(peak)
            results.setdefault(name, result)
            assert result == results[name], f"{name} changed its answer between repeats"
            print(f"  repeat {repeat} {name:<18} {seconds:8.2f} s  peak +{peak / 2**20:9.1f} MiB", flush=True)

    ours, base = results["evaluate_ranking"], results["full_sort_baseline"]
    print("metrics:", {k: round(v, 4) if isinstance(v, float) else v for k, v in ours.items()})
    worst = max(abs(ours[k] - base[k]) / max(abs(base[k]), 1e-300) for k in base)
    # R@k and the counts come from integer counts and must match exactly; mAP/mINP may differ in the
    # last bit because the two methods add the same float64 terms in a different order.
    exact = [k for k in base if ours[k] == base[k]]
    print(f"numbers: bit-identical for {exact}; largest relative difference over all {worst:.2e}")
    t_ours, t_base = statistics.median(times["evaluate_ranking"]), statistics.median(times["full_sort_baseline"])
    m_ours, m_base = max(peaks["evaluate_ranking"]), max(peaks["full_sort_baseline"])
    print(f"time  (median of {args.repeats}): evaluate_ranking {t_ours:.2f} s, baseline {t_base:.2f} s, "
          f"speed-up {t_base / t_ours:.2f}x")
    print(f"peak memory above the input: evaluate_ranking {m_ours / 2**20:.1f} MiB, baseline {m_base / 2**20:.1f} MiB, "
          f"ratio {m_ours / m_base:.4f}")
    print(f"load average at the end {os.getloadavg()}")
    if worst > 1e-12 or any(ours[k] != base[k] for k in base if k not in ("mAP", "mINP")):
        raise SystemExit("evaluate_ranking and the baseline disagree")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
