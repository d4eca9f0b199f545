"""Pairs/s and peak memory of full CFine training steps (encoders + head + losses + backward + Adam step)
on a synthetic batch with random weights, on whatever device is present.

    python benchmarks/train_throughput.py --arch vit_b16 --batch 64 --amp bf16      # a GPU: the real shapes
    python benchmarks/train_throughput.py                                          # CPU default: small config
    python benchmarks/train_throughput.py --arch vit_b16 --batch 8 --steps 3 --warmup 1 --text_encoder clip bert
With several --text_encoder values each is measured in the same run and compared with the first
(bert: a random BERT-base, 100 tokens, unprojected 768-d image tokens: the authors' release, docs/method.md §9).
Reference point: the authors' log shows about 71 pairs/s (batch 32, fp32, one RTX 3090).

    python benchmarks/train_throughput.py --arch vit_b16 --batch 32 --chunk_size 8 --steps 2 --warmup 2 --amp off
With --chunk_size the whole-batch step and the gradient-caching step (train.py --chunk_size) each run in a
subprocess of their own, one after the other, and the run ends with
    peak memory: unchunked X MiB, chunked Y MiB (Z.Zx less); pairs/s: unchunked A, chunked B
Peak memory is what a training step adds to the memory held between steps (weights, gradients, Adam's
moments, StepGuard's copy of the BN statistics): on CPU the growth of the peak resident set (VmHWM, reset
after the warm-up steps; glibc's mmap threshold fixed so freed tensors leave the resident set); on CUDA the
growth of max_memory_allocated over memory_allocated between steps.
A third subprocess measures the chunked step's whole-batch phase alone (cached tokens, head, losses, backward)
at 1, 4, 16 and 64 times the batch and fits it with a B^2 term (the B x B similarities). From these peaks it
computes each pair's encoder memory and the largest batch that fits a GPU, whole and chunked.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from clip.config import CLIPConfig  # noqa: E402
from clip.model import TokenFeatures  # noqa: E402
from engine.grad_cache import forward_backward  # noqa: E402
from engine.loop import guarded_update  # noqa: E402
from engine.settings import AMP_MODES  # noqa: E402
from engine.step_guard import StepGuard  # noqa: E402
from models.cfine import CFine  # noqa: E402
from models.config import CFineConfig  # noqa: E402
from models.optim import build_optimizer  # noqa: E402
from models.precision import autocast, resolve_amp  # noqa: E402

AUTHORS_PAIRS_PER_S = 71.0
GPU_GIB = (8, 16, 24, 80)  # the table's GPU sizes, GiB
# Between steps each trainable fp32 parameter holds: weight 4, gradient 4, Adam's two moments 8 bytes. StepGuard
# adds nothing per parameter: it skips a bad step before the update and copies only the buffers (engine/step_guard.py).
STATE_BYTES_PER_PARAM = 16


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--arch", choices=["vit_b16", "tiny"], default="vit_b16" if cuda else "tiny")
    parser.add_argument("--image_size", "--image-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="default 224 224 for vit_b16, 64 32 for tiny")
    parser.add_argument("--batch", type=int, default=64 if cuda else 32)
    parser.add_argument("--amp", choices=AMP_MODES, default="auto")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (after --warmup steps)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--num_classes", "--num-classes", type=int, default=11003)
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--text_encoder", "--text-encoder", nargs="+", choices=["clip", "bert"], default=["clip"],
                        help="one or more; bert needs `transformers` (requirements-bert.txt)")
    parser.add_argument("--no_guard", "--no-guard", action="store_true",
                        help="time the bare step, without train.py's StepGuard (its gradient check, its copy of the BN "
                             "statistics and its one sync)")
    parser.add_argument("--chunk_size", "--chunk-size", type=int, default=None,
                        help="compare the whole-batch step with gradient caching in chunks of this many pairs "
                             "(peak memory and pairs/s, each in a subprocess)")
    parser.add_argument("--measure", choices=["whole", "chunked", "head"], default=None, help=argparse.SUPPRESS)
    return parser


def build(args: argparse.Namespace, text_encoder: str, size: tuple[int, int]) -> CFine:
    """CFine with random weights: CLIP text (D=512, or the tiny width), or BERT-base (tiny: 2 layers, width 64)."""
    clip_config = CLIPConfig.vit_b16(size) if args.arch == "vit_b16" else CLIPConfig.tiny(size)
    if text_encoder == "clip":
        return CFine(CFineConfig(clip=clip_config, num_classes=args.num_classes))
    import transformers

    from models.text_encoders.bert import architecture

    if args.arch == "vit_b16":
        bert = transformers.BertConfig()  # bert-base-uncased's shape
    else:
        bert = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=1, intermediate_size=256)
    config = CFineConfig(clip=clip_config.vision_only(), text_encoder="bert", bert=architecture(bert.to_dict()),
                         num_classes=args.num_classes)
    return CFine(config, text_vocab="[PAD]\n")  # the vocabulary is not used: ids are drawn at random


def random_ids(text_encoder: str, batch: int, vocab_size: int, device: torch.device) -> torch.Tensor:
    """Captions of 8-60 tokens: CLIP [SOT, words, EOT, 0...] (77) or BERT [[CLS], words, [SEP], 0...] (100)."""
    length, first, last = (77, 49406, 49407) if text_encoder == "clip" else (100, 101, 102)
    tokens = torch.zeros(batch, length, dtype=torch.long, device=device)
    lengths = torch.randint(8, 60, (batch,), device=device)
    positions = torch.arange(length, device=device)
    words = torch.randint(1000, min(vocab_size, 49000), tokens.shape, device=device)
    tokens = torch.where(positions < lengths[:, None], words, tokens)
    tokens[:, 0] = first
    tokens[torch.arange(batch, device=device), lengths] = last
    return tokens


class Runner:
    """One model, its optimizer and a fixed synthetic batch; step() is one full training step."""

    def __init__(self, args: argparse.Namespace, text_encoder: str, chunk_size: int | None = None):
        self.device = device = torch.device(args.device)
        self.amp = resolve_amp(args.amp, device)
        self.size = tuple(args.image_size) if args.image_size else ((224, 224) if args.arch == "vit_b16" else (64, 32))
        self.text_encoder = text_encoder
        torch.manual_seed(0)
        self.model = build(args, text_encoder, self.size).to(device).train()
        self.optimizer, _ = build_optimizer(self.model)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp == "fp16")
        self.images = torch.randn(args.batch, 3, *self.size, device=device)
        vocab = self.model.config.bert["vocab_size"] if text_encoder == "bert" else 49408
        self.tokens = random_ids(text_encoder, args.batch, vocab, device)
        self.pids = torch.randint(0, min(max(2, args.batch // 2), args.num_classes), (args.batch,), device=device)
        self.guard = None if args.no_guard else StepGuard(self.model, args.warmup + args.steps + 1)
        self.chunk_size = chunk_size
        self.times: list[float] = []

    def step(self, timed: bool = True) -> torch.Tensor:
        """train.py's step (engine/loop.py): buffer copy, forward and backward (whole, or chunked), guarded update."""
        start = time.perf_counter()
        if self.guard:
            self.guard.save_buffers()
        self.optimizer.zero_grad(set_to_none=True)
        loss = forward_backward(self.model, self.images, self.tokens, self.pids, scale=self.scaler.scale,
                                precision=lambda: autocast(self.device, self.amp), chunk_size=self.chunk_size).loss
        if self.guard:
            guarded_update(self.optimizer, self.scaler, self.guard, loss, False)
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        if timed:
            self.times.append(time.perf_counter() - start)
        return loss


def main(args: argparse.Namespace) -> None:
    """Warm every runner up, then time their steps in turn (interleaved: a shared, busy machine slows all alike)."""
    runners = [Runner(args, name) for name in args.text_encoder]
    for runner in runners:
        for _ in range(args.warmup):
            runner.step(timed=False)
    if runners[0].device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.steps):
        for runner in runners:
            loss = runner.step()
            if not torch.isfinite(loss):
                raise SystemExit(f"{runner.text_encoder}: a loss was not finite ({float(loss)}): not meaningful")
    medians = {}
    for runner in runners:
        median = medians[runner.text_encoder] = statistics.median(runner.times)
        pairs_per_s = args.batch / median
        print(f"text_encoder={runner.text_encoder} arch={args.arch} image={runner.size[0]}x{runner.size[1]} "
              f"batch={args.batch} amp={runner.amp} device={runner.device} threads={torch.get_num_threads()} "
              f"steps={args.steps} (median step {median * 1000:.1f} ms)")
        print(f"throughput: {pairs_per_s:.1f} pairs/s")
        if args.arch == "vit_b16":  # only the real shapes compare with the authors' ViT-B/16 figure
            print(f"vs the authors' ~{AUTHORS_PAIRS_PER_S:.0f} pairs/s (RTX 3090, fp32, batch 32): "
                  f"{pairs_per_s / AUTHORS_PAIRS_PER_S:.2f}x (different hardware: indicative only)")
    if runners[0].device.type == "cuda":
        print(f"peak memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (max allocated over all runs, "
              f"{torch.cuda.get_device_name()})")
    else:
        print(f"peak memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process peak RSS, "
              "all models together)")
    first = args.text_encoder[0]
    for name in args.text_encoder[1:]:
        print(f"step time {name} / {first}: {medians[name] / medians[first]:.2f}x "
              f"({medians[name]:.3f} s vs {medians[first]:.3f} s, interleaved)")


class PeakMemory:
    """Peak memory since reset(), which returns the baseline: CUDA max_memory_allocated; CPU the peak resident
    set (VmHWM, reset by writing 5 to /proc/self/clear_refs)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def reset(self) -> int:
        """Start a new peak; returns the memory held now (the baseline), bytes."""
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        return _proc_status_kib("VmRSS") * 1024

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return _proc_status_kib("VmHWM") * 1024


def _proc_status_kib(key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+) kB", open("/proc/self/status").read(), re.M).group(1))


def measure(args: argparse.Namespace) -> None:
    """(In a subprocess) one mode's warm steps: prints a JSON line with pairs/s and the peak memory they added."""
    runner = Runner(args, args.text_encoder[0], args.chunk_size if args.measure == "chunked" else None)
    if args.measure == "head":
        return measure_head(runner, args)
    # At least 2: the first step creates Adam's state and StepGuard's copy of the buffers (held from then on).
    for _ in range(max(args.warmup, 2)):
        runner.step(timed=False)
    memory = PeakMemory(runner.device)
    held = memory.reset()
    for _ in range(args.steps):
        loss = runner.step()
        if not torch.isfinite(loss):
            raise SystemExit(f"{args.measure}: a loss was not finite ({float(loss)}): not meaningful")
    params = sum(p.numel() for p in runner.model.parameters() if p.requires_grad)
    print(json.dumps({"mode": args.measure, "median_s": statistics.median(runner.times), "held_bytes": held,
                      "peak_bytes": memory.peak(), "trainable_params": params, "amp": runner.amp,
                      "device": str(runner.device), "threads": torch.get_num_threads(), "size": runner.size}))


def measure_head(runner: Runner, args: argparse.Namespace) -> None:
    """(In a subprocess) the chunked step's whole-batch phase alone at growing batch sizes: cached tokens (as
    leaves), head, losses, backward. Its memory has a term in B^2 (the B x B x tokens similarities of CFR)."""
    model, memory = runner.model, PeakMemory(runner.device)
    with torch.no_grad(), autocast(runner.device, runner.amp):
        image, text = model(runner.images[:1], runner.tokens[:1], stage="encoders")  # one pair's shapes and dtypes

    def head_step(size: int) -> int:
        base = memory.reset()
        leaves = [TokenFeatures(torch.randn(size, *f.tokens.shape[1:], dtype=f.tokens.dtype, device=runner.device)
                                .requires_grad_(), f.global_attention.expand(size, -1) + torch.rand(
                                    size, f.global_attention.shape[1], device=runner.device),
                                f.global_index.expand(size), None if f.padding_mask is None
                                else f.padding_mask.expand(size, -1)) for f in (image, text)]
        pids = torch.randint(0, min(max(2, size // 2), model.config.num_classes), (size,), device=runner.device)
        with autocast(runner.device, runner.amp):
            loss = model(*leaves, pids, stage="head").loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        del leaves, loss
        return memory.peak() - base

    head_step(4)  # loads the libraries' code before any baseline
    sizes = [args.batch * factor for factor in (1, 4, 16, 64)]
    token_bytes = sum(f.tokens[0].numel() * f.tokens.element_size() for f in (image, text))
    print(json.dumps({"mode": "head", "sizes": sizes, "peak_bytes": [head_step(size) for size in sizes],
                      "token_bytes_per_pair": token_bytes}))


def _largest_batch(fits: Callable[[int], bool], limit: int = 1 << 20) -> int:
    """The largest B >= 0 with fits(B) (fits is monotone): doubling, then bisection."""
    high = 1
    while high < limit and fits(high):
        high *= 2
    low = high // 2 if fits(high // 2) else 0
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def compare_chunked(args: argparse.Namespace) -> None:
    """Whole-batch and chunked steps, each in a subprocess; the comparison line and the computed GPU table."""
    if len(args.text_encoder) != 1:
        raise SystemExit("--chunk_size compares one text encoder: give a single --text_encoder")
    if not 1 <= args.chunk_size <= args.batch:
        raise SystemExit(f"--chunk_size {args.chunk_size}: give 1 to --batch ({args.batch})")
    # A fixed mmap threshold: glibc then returns every freed tensor to the OS, so the resident set follows the
    # memory in use (its default moves the threshold up and keeps large freed blocks in the heap).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    results = {}
    for mode in ("whole", "chunked", "head"):
        done = subprocess.run([sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--measure", mode],
                              env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"the {mode} measurement failed:\n{done.stderr[-3000:]}")
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    whole, chunked, head = results["whole"], results["chunked"], results["head"]
    cuda, mib, batch, chunk = whole["device"].startswith("cuda"), 2**20, args.batch, args.chunk_size
    # What a step adds to the memory held between steps (CUDA: allocated; CPU: resident).
    peak = {m: (r["peak_bytes"] - r["held_bytes"]) / mib for m, r in (("whole", whole), ("chunked", chunked))}
    rate = {m: batch / r["median_s"] for m, r in (("whole", whole), ("chunked", chunked))}
    print(f"arch={args.arch} image={whole['size'][0]}x{whole['size'][1]} text_encoder={args.text_encoder[0]} "
          f"batch={batch} chunk_size={chunk} amp={whole['amp']} device={whole['device']} threads={whole['threads']} "
          f"steps={args.steps} after {max(args.warmup, 2)} warm-up (medians: whole {whole['median_s']:.2f} s, "
          f"chunked {chunked['median_s']:.2f} s; run one after the other)")

    # The computed table. Memory model, all terms measured above (MiB): whole(B) = state + B e + head(B), with
    # e the encoders' activations per pair; chunked(B) = state + max(c e_c + B t, head(B)): one chunk's encoder
    # pass while the whole batch's tokens and their gradients (t per pair) are held, or the whole-batch phase.
    sizes, head_mib = head["sizes"], [b / mib for b in head["peak_bytes"]]
    # head(B) = c + a B + q B^2 (c: the head's own gradients, the classifier's above all), least squares.
    c, a, q = np.linalg.lstsq(np.array([[1.0, b, b * b] for b in sizes]), np.array(head_mib), rcond=None)[0]
    q = max(q, 0.0)  # a negative B^2 term would be noise
    head_at = lambda b: c + a * b + q * b * b  # noqa: E731
    per_token_pair = 2 * head["token_bytes_per_pair"] / mib  # the cached tokens and their gradients
    e = (peak["whole"] - head_at(batch)) / batch
    e_chunk = (peak["chunked"] - batch * per_token_pair) / chunk
    state = whole["held_bytes"] / mib if cuda else whole["trainable_params"] * STATE_BYTES_PER_PARAM / mib
    how = "measured" if cuda else f"{STATE_BYTES_PER_PARAM} bytes x {whole['trainable_params']:,} trainable parameters"
    print("whole-batch phase alone (measured): " + ", ".join(f"batch {b}: {m:.0f} MiB" for b, m in zip(sizes, head_mib))
          + f"; fitted: head(B) = {c:.0f} MiB + {a:.2f} MiB x B + {q * 1024:.3f} KiB x B^2")
    print(f"per pair (computed from the peaks above): encoders {e:.1f} MiB whole, {e_chunk:.1f} MiB in a chunk's pass; "
          f"cached tokens + gradients {per_token_pair:.2f} MiB; state between steps {state:.0f} MiB ({how})")
    for gib in GPU_GIB:
        free = gib * 1024 - state
        fits_whole = _largest_batch(lambda b: b * e + head_at(b) <= free)
        fits_chunked = _largest_batch(lambda b: max(chunk * e_chunk + b * per_token_pair, head_at(b)) <= free)
        beyond = " (beyond the measured sizes: extrapolated)" if max(fits_whole, fits_chunked) > sizes[-1] else ""
        print(f"largest batch (computed) on {gib} GiB: whole {fits_whole}, chunk {chunk} {fits_chunked}{beyond}")
    less = f"{peak['whole'] / peak['chunked']:.1f}x less" if peak["chunked"] > 0 else "no growth measured chunked"
    print(f"peak memory: unchunked {peak['whole']:.0f} MiB, chunked {peak['chunked']:.0f} MiB ({less}); "
          f"pairs/s: unchunked {rate['whole']:.2f}, chunked {rate['chunked']:.2f}")


if __name__ == "__main__":
    parsed = get_args_parser().parse_args()
    if parsed.measure:
        measure(parsed)
    elif parsed.chunk_size is not None:
        compare_chunked(parsed)
    else:
        main(parsed)
