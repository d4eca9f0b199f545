"""Pairs/s and peak memory of full CFine training steps (encoders + head + losses + backward + Adam step)
on a synthetic batch with random weights, on whatever device is present.

    python benchmarks/train_throughput.py --arch vit_b16 --batch 64 --amp bf16      # a GPU: the real shapes
    python benchmarks/train_throughput.py                                          # CPU default: small config
Reference point: the authors' log shows about 71 pairs/s (batch 32, fp32, one RTX 3090).
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from clip.config import CLIPConfig  # noqa: E402
from models.cfine import CFine  # noqa: E402
from models.config import CFineConfig  # noqa: E402
from models.optim import build_optimizer  # noqa: E402
from utils.step_guard import StepGuard  # noqa: E402
from utils.training import autocast, resolve_amp  # noqa: E402

AUTHORS_PAIRS_PER_S = 71.0


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--arch", choices=["vit_b16", "tiny"], default="vit_b16" if cuda else "tiny")
    parser.add_argument("--image_size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="default 224 224 for vit_b16, 64 32 for tiny")
    parser.add_argument("--batch", type=int, default=64 if cuda else 32)
    parser.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (after --warmup steps)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--num_classes", type=int, default=11003)
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--no_guard", action="store_true",
                        help="time the bare step, without train.py's StepGuard (its copy of the state and its one sync)")
    return parser


def main(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    amp = resolve_amp(args.amp, device)
    size = tuple(args.image_size) if args.image_size else ((224, 224) if args.arch == "vit_b16" else (64, 32))
    clip_config = CLIPConfig.vit_b16(size) if args.arch == "vit_b16" else CLIPConfig.tiny(size)
    torch.manual_seed(0)
    model = CFine(CFineConfig(clip=clip_config, num_classes=args.num_classes)).to(device).train()
    optimizer, _ = build_optimizer(model)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    guard = None if args.no_guard else StepGuard(model, optimizer, limit=args.warmup + args.steps + 1)
    images = torch.randn(args.batch, 3, *size, device=device)
    tokens = torch.zeros(args.batch, 77, dtype=torch.long, device=device)
    lengths = torch.randint(8, 60, (args.batch,), device=device)
    positions = torch.arange(77, device=device)
    tokens = torch.where(positions < lengths[:, None], torch.randint(1, 49000, tokens.shape, device=device), tokens)
    tokens[:, 0] = 49406
    tokens[torch.arange(args.batch, device=device), lengths] = 49407
    pids = torch.randint(0, max(2, args.batch // 2), (args.batch,), device=device)

    def step():  # train.py's step: guard, forward, backward, update, one verdict
        if guard:
            guard.save()
        with autocast(device, amp):
            loss = model(images, tokens, pids).loss
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if guard:
            guard.accept(*guard.verdict(loss, False)[:2])
        return loss

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if not torch.isfinite(loss):
        raise SystemExit(f"the last loss was not finite ({float(loss)}): the measurement is not meaningful")
    pairs_per_s = args.batch / statistics.median(times)
    if device.type == "cuda":
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (max allocated on {torch.cuda.get_device_name()})"
    else:
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process peak RSS)"
    print(f"arch={args.arch} image={size[0]}x{size[1]} batch={args.batch} amp={amp} device={device} "
          f"{'bare step' if args.no_guard else 'with the StepGuard'} "
          f"steps={args.steps} (median step {statistics.median(times) * 1000:.1f} ms)")
    print(f"throughput: {pairs_per_s:.1f} pairs/s; peak memory: {peak}")
    if args.arch == "vit_b16":  # only the real shapes compare with the authors' ViT-B/16 figure
        print(f"vs the authors' ~{AUTHORS_PAIRS_PER_S:.0f} pairs/s (RTX 3090, fp32, batch 32): "
              f"{pairs_per_s / AUTHORS_PAIRS_PER_S:.2f}x (different hardware: indicative only)")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
