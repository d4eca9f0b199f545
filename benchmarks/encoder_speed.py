"""Images/s of our ViT-B/16 image encoder (all token outputs + the class token's attention row) against
open_clip's ViT-B-16-quickgelu `encode_image` (pooled feature only), same weights and inputs, interleaved.

    python benchmarks/encoder_speed.py [--batch 8] [--repeats 5] [--device cpu|cuda] [--amp bf16|off]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from clip.config import CLIPConfig  # noqa: E402
from clip.model import CLIP  # noqa: E402
from engine.settings import default_device  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per encoder (interleaved)")
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--amp", choices=["bf16", "off"], default="off")
    return parser


def _timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(args: argparse.Namespace) -> None:
    import open_clip  # test/benchmark-only dependency (requirements-dev.txt)

    device = torch.device(args.device)
    torch.manual_seed(0)
    reference = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None).eval().to(device)
    ours = CLIP(CLIPConfig.vit_b16()).eval().to(device)
    ours.load_state_dict(reference.state_dict(), strict=True)
    images = torch.randn(args.batch, 3, 224, 224, device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16")

    def run_ours():
        out = ours.encode_image_tokens(images)
        return out.tokens, out.global_attention

    def run_reference():
        return reference.encode_image(images)

    with torch.inference_mode(), amp:
        pooled_error = (ours.encode_image(images).float() - reference.encode_image(images).float()).abs().max().item()
        run_ours(), run_reference()  # warm-up
        times = {"ours": [], "open_clip": []}
        for _ in range(args.repeats):
            times["ours"].append(_timed(run_ours, device))
            times["open_clip"].append(_timed(run_reference, device))

    rate = {name: args.batch / statistics.median(t) for name, t in times.items()}
    print(f"device={device} batch={args.batch} repeats={args.repeats} amp={args.amp} threads={torch.get_num_threads()}")
    print(f"max |pooled feature difference| = {pooled_error:.2e}")
    print(f"ours (tokens + attention row): {rate['ours']:8.2f} images/s")
    print(f"open_clip encode_image:        {rate['open_clip']:8.2f} images/s")
    print(f"ratio ours / open_clip:        {rate['ours'] / rate['open_clip']:8.3f}x")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
