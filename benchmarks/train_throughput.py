"""Pairs/s and peak memory of full CFine training steps (encoders + head + losses + backward + Adam step)
on a synthetic batch with random weights, on whatever device is present.

    python benchmarks/train_throughput.py --arch vit_b16 --batch 64 --amp bf16      # a GPU: the real shapes
    python benchmarks/train_throughput.py                                          # CPU default: small config
    python benchmarks/train_throughput.py --arch vit_b16 --batch 8 --steps 3 --warmup 1 --text_encoder clip bert
With several --text_encoder values each is measured in the same run and compared with the first
(bert: a random BERT-base, 100 tokens, unprojected 768-d image tokens: the authors' release, spec §9).
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
    parser.add_argument("--image_size", "--image-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="default 224 224 for vit_b16, 64 32 for tiny")
    parser.add_argument("--batch", type=int, default=64 if cuda else 32)
    parser.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (after --warmup steps)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--num_classes", "--num-classes", type=int, default=11003)
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--text_encoder", "--text-encoder", nargs="+", choices=["clip", "bert"], default=["clip"],
                        help="one or more; bert needs `transformers` (requirements-bert.txt)")
    parser.add_argument("--no_guard", "--no-guard", action="store_true",
                        help="time the bare step, without train.py's StepGuard (its copy of the state and its one sync)")
    return parser


def build(args: argparse.Namespace, text_encoder: str, size: tuple[int, int]) -> CFine:
    """CFine with random weights: CLIP text (D=512, or the tiny width), or BERT-base (tiny: 2 layers, width 64)."""
    clip_config = CLIPConfig.vit_b16(size) if args.arch == "vit_b16" else CLIPConfig.tiny(size)
    if text_encoder == "clip":
        return CFine(CFineConfig(clip=clip_config, num_classes=args.num_classes))
    import transformers

    from models.bert_text import architecture

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

    def __init__(self, args: argparse.Namespace, text_encoder: str):
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
        self.pids = torch.randint(0, max(2, args.batch // 2), (args.batch,), device=device)
        self.guard = None if args.no_guard else StepGuard(self.model, self.optimizer, args.warmup + args.steps + 1)
        self.times: list[float] = []

    def step(self, timed: bool = True) -> torch.Tensor:
        """train.py's step: guard copy, forward, backward, update, one verdict."""
        start = time.perf_counter()
        if self.guard:
            self.guard.save()
        with autocast(self.device, self.amp):
            loss = self.model(self.images, self.tokens, self.pids).loss
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.guard:
            self.guard.accept(*self.guard.verdict(loss, False)[:2])
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


if __name__ == "__main__":
    main(get_args_parser().parse_args())
