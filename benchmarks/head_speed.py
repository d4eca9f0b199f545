"""Forward + backward time and peak memory of the CFine head (MGF + BN + CFR + FCD + all losses):
the vectorised models/ code against the loop reference of tests/cfine_reference.py, on random token inputs.

Each (path, batch) runs in a fresh subprocess so that peak memory is its own: CUDA reports
torch.cuda.max_memory_allocated, CPU the growth of the process's peak resident set (ru_maxrss) over a
baseline taken after a batch-4 step (which loads the math libraries). On a shared CPU, --threads 1
avoids OpenMP oversubscription, which otherwise makes timings swing by 10x.
Run from the repository root:

    python benchmarks/head_speed.py --device cpu --batch_sizes 32 128 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # models/ and tests/ are top-level packages of the repository

PATHS = ("vectorised", "reference")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--batch_sizes", "--batch-sizes", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--repeats", type=int, default=3, help="timed forward+backward steps per path (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    parser.add_argument("--width", type=int, default=512, help="D")
    parser.add_argument("--image_tokens", "--image-tokens", type=int, default=197, help="class token + patches")
    parser.add_argument("--text_length", "--text-length", type=int, default=77)
    parser.add_argument("--num_classes", "--num-classes", type=int, default=11003, help="CMPC classifier width (CUHK-PEDES ids)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--parity", action="store_true", help="print value/gradient differences of the two paths")
    parser.add_argument("--worker", choices=PATHS, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    return parser


def _inputs(batch: int, args, device):
    """Random encoder outputs: tokens, the global token's attention rows, padded captions of varied length."""
    import torch

    from tests.cfine_reference import random_image_tokens, random_text_tokens

    g = torch.Generator().manual_seed(0)
    image = random_image_tokens(batch, args.image_tokens, args.width, g)
    eot = torch.randint(8, min(60, args.text_length), (batch,), generator=g)
    text = random_text_tokens(batch, args.text_length, args.width, eot, g)
    pids = torch.randint(0, max(1, batch // 2), (batch,), generator=g)  # some identities appear twice or more
    move = lambda feats: feats._replace(**{f: getattr(feats, f).to(device)  # noqa: E731
                                           for f in feats._fields if getattr(feats, f) is not None})
    return move(image), move(text), pids.to(device)


def worker(args) -> dict:
    """Time and measure one path at one batch size in this process; returns a JSON-able record."""
    import torch

    from clip.model import CLIPConfig
    from models import CFineConfig, CFineHead
    from tests.cfine_reference import head_losses

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = CFineConfig(clip=CLIPConfig.vit_b16(), num_classes=args.num_classes)
    config.clip.embed_dim = args.width
    head = CFineHead(config).to(device).train()
    image, text, pids = _inputs(args.batch, args, device)

    def step(image, text, pids) -> float:
        img = image._replace(tokens=image.tokens.clone().requires_grad_())
        txt = text._replace(tokens=text.tokens.clone().requires_grad_())
        if args.worker == "vectorised":
            loss = head(img, txt, pids).loss
        else:
            loss = head_losses(head, img, txt, pids)["loss"]
        loss.backward()
        head.zero_grad(set_to_none=True)
        return float(loss.detach())

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    step(*_inputs(4, args, device))  # loads the math libraries' code before the memory baseline is taken
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for i in range(args.warmup + args.repeats):
        sync()
        start = time.perf_counter()
        loss = step(image, text, pids)
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {
        "path": args.worker,
        "batch": args.batch,
        "seconds": statistics.median(times),
        "peak_bytes": peak,
        "loss": loss,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }


def parity(batch: int, args) -> dict:
    """Largest absolute and relative differences, vectorised vs reference, in values and gradients (fp32)."""
    import torch

    from clip.model import CLIPConfig
    from models import CFineConfig, CFineHead
    from tests.cfine_reference import head_losses

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = CFineConfig(clip=CLIPConfig.vit_b16(), num_classes=args.num_classes)
    config.clip.embed_dim = args.width
    head = CFineHead(config).to(args.device).train()
    params = [p for p in head.parameters() if p.requires_grad]
    outputs = {}
    for path in PATHS:
        image, text, pids = _inputs(batch, args, args.device)
        image = image._replace(tokens=image.tokens.requires_grad_())
        text = text._replace(tokens=text.tokens.requires_grad_())
        if path == "vectorised":
            out = head(image, text, pids)
            values = {"image_features": out.image_features, "text_features": out.text_features, **out.losses}
            loss = out.loss
        else:
            ref = head_losses(head, image, text, pids)
            values = {k: ref[k] for k in ("image_features", "text_features", "cmpm", "cmpc", "diversity", "ranking")}
            loss = ref["loss"]
        grads = torch.autograd.grad(loss, [image.tokens, text.tokens, *params])
        outputs[path] = ([v.detach() for v in values.values()], grads)

    def worst(pairs):
        """Largest absolute difference; largest norm-wise relative one among tensors that are not ~0."""
        abs_err = max(float((a - b).abs().max()) for a, b in pairs)
        # Some exact gradients are 0 (BN cancels the bias of the layer before it): no relative error there.
        rel_err = max(float((a - b).norm() / b.norm()) for a, b in pairs if b.norm() > 1e-4 * b.numel() ** 0.5)
        return abs_err, rel_err

    (vec_values, vec_grads), (ref_values, ref_grads) = outputs["vectorised"], outputs["reference"]
    return {"values": worst(list(zip(vec_values, ref_values))), "gradients": worst(list(zip(vec_grads, ref_grads)))}


def run_in_subprocess(path: str, batch: int, args) -> dict:
    """One fresh interpreter per measurement, so that peak memory belongs to that path alone."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", path, "--batch", str(batch)]
    for flag in ("device", "repeats", "warmup", "width", "image_tokens", "text_length", "num_classes", "threads"):
        command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"benchmark worker ({path}, batch {batch}) failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(args) -> None:
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.parity:
        for batch in args.batch_sizes:
            errors = parity(batch, args)
            for kind, (abs_err, rel_err) in errors.items():
                print(f"batch {batch} {kind:>9}: max |vectorised - reference| {abs_err:.2e}, relative {rel_err:.2e}")
        return
    results = []
    print(
        f"CFine head, forward + backward: D={args.width}, {args.image_tokens} image tokens, "
        f"{args.text_length} text tokens, device {args.device}, median of {args.repeats} after {args.warmup} warm-up"
    )
    header = f"{'batch':>5} {'path':>10} {'time s':>9} {'peak MiB':>9} {'loss':>12}"
    print(header)
    for batch in args.batch_sizes:
        pair = {path: run_in_subprocess(path, batch, args) for path in PATHS}
        for path in PATHS:
            r = pair[path]
            print(f"{batch:>5} {path:>10} {r['seconds']:>9.3f} {r['peak_bytes'] / 2**20:>9.1f} {r['loss']:>12.5f}")
        speedup = pair["reference"]["seconds"] / pair["vectorised"]["seconds"]
        memory = pair["vectorised"]["peak_bytes"] / max(pair["reference"]["peak_bytes"], 1)
        print(f"{batch:>5} {'ratio':>10} {speedup:>8.1f}x faster, peak memory {memory:.3f} of the reference")
        results.append({"batch": batch, **pair, "speedup": speedup, "memory_fraction": memory})
    print(f"threads: {results[0]['vectorised']['threads']}, device: {results[0]['vectorised']['device']}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
