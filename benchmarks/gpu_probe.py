"""The Python parts of benchmarks/gpu_checks.sh: one subcommand per question, each writing OUT/<name>.json.

    python -m benchmarks.gpu_probe env --out OUT                  # versions, device, SDPA backends
    python -m benchmarks.gpu_probe throughput --out OUT RUN...    # pairs/s of train.py runs (their metrics.jsonl)
    python -m benchmarks.gpu_probe precision --out OUT            # loss parts, gradient cosine: fp32/bf16/fp16
    python -m benchmarks.gpu_probe sync --out OUT                 # training steps under CUDA's sync debug mode
    python -m benchmarks.gpu_probe memory --out OUT               # peak memory of a bf16 step at batch 32/64/128, whole and chunk 8
    python -m benchmarks.gpu_probe eval --out OUT                 # evaluation time by phase, CUHK-PEDES test size
    python -m benchmarks.gpu_probe checkpoint --out OUT           # train.py's checkpoint write: seconds and MiB
    python -m benchmarks.gpu_probe summary --out OUT              # OUT/*.json -> OUT/summary.json
Random weights, synthetic inputs, only the runtime requirements. `--arch tiny --device cpu` runs every
subcommand on a CPU in seconds (what tests/test_gpu_checks.py does through `DEVICE=cpu bash gpu_checks.sh`).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.train_throughput import random_ids  # noqa: E402
from clip.config import CLIPConfig  # noqa: E402
from datasets.transforms import to_model_input  # noqa: E402
from engine.grad_cache import forward_backward  # noqa: E402
from engine.run_files import save_files  # noqa: E402
from evaluation.metrics import evaluate_retrieval  # noqa: E402
from models.cfine import CFine, retrieval_features  # noqa: E402
from models.checkpoint import save_checkpoint  # noqa: E402
from models.config import CFineConfig  # noqa: E402
from models.optim import build_optimizer  # noqa: E402
from models.precision import autocast  # noqa: E402

CUHK_TEST = {"images": 3074, "captions": 6156, "ids": 1000}
NUM_CLASSES = 11003  # CUHK-PEDES training identities


def build(arch: str, device: torch.device, num_classes: int = NUM_CLASSES) -> CFine:
    """CFine with random weights: ViT-B/16 at 224x224, or the tiny model at 64x32."""
    torch.manual_seed(0)
    clip_config = CLIPConfig.vit_b16((224, 224)) if arch == "vit_b16" else CLIPConfig.tiny((64, 32))
    return CFine(CFineConfig(clip=clip_config, num_classes=num_classes)).to(device)


def batch_of(model: CFine, size: int, device: torch.device, seed: int = 0):
    """(images, tokens, pids) of `size` pairs, two per identity, on device."""
    torch.manual_seed(seed)
    images = torch.randn(size, 3, *model.config.clip.vision.image_size).to(device)
    return images, random_ids("clip", size, 49408, torch.device("cpu")).to(device), (torch.arange(size) // 2).to(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model, optimizer, images, tokens, pids, amp: str, chunk_size: int | None = None):
    """train.py's step without the guard: forward and backward under autocast (whole, or gradient caching in
    chunks), fused/default Adam."""
    optimizer.zero_grad(set_to_none=True)
    out = forward_backward(model, images, tokens, pids, precision=lambda: autocast(images.device, amp),
                           scale=lambda loss: loss, chunk_size=chunk_size)
    optimizer.step()
    return out


def training_setup(args):
    """(device, model in training mode, its optimiser: fused Adam on CUDA)."""
    device = torch.device(args.device)
    model = build(args.arch, device).train()
    return device, model, build_optimizer(model)[0]


def package_versions() -> dict:
    """The installed versions of the runtime requirements (gpu_checks.sh may have added ftfy and wcwidth)."""
    found = {}
    for name in ("torch", "torchvision", "numpy", "Pillow", "tqdm", "ftfy", "wcwidth", "regex", "matplotlib", "transformers"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def cmd_env(args) -> dict:
    cuda = torch.cuda.is_available()
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if cuda else None, "device": args.device,
            "cpu_threads": torch.get_num_threads(), "packages": package_versions()}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info |= {"gpu": props.name, "capability": f"{props.major}.{props.minor}",
                 "memory_gib": round(props.total_memory / 2**30, 1), "nccl": ".".join(map(str, torch.cuda.nccl.version())),
                 "bf16": torch.cuda.is_bf16_supported(),
                 "sdpa": {"flash": torch.backends.cuda.flash_sdp_enabled(),
                          "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                          "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
                          "math": torch.backends.cuda.math_sdp_enabled()}}
        info["sdpa_used"] = sdpa_backend(torch.device(args.device))
    return info


def sdpa_backend(device: torch.device) -> str:
    """The first SDPA backend that runs CLIP's attention shape (B 64, 12 heads, 197 tokens, 64 dims) in bf16."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(64, 12, 197, 64, device=device, dtype=torch.bfloat16)
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel(backend):
                torch.nn.functional.scaled_dot_product_attention(q, q, q)
            return backend.name
        except RuntimeError:
            continue
    return "MATH"


def cmd_throughput(args) -> dict:
    """Per run: every epoch's pairs/s and seconds from its metrics.jsonl; the last epoch is the warm figure."""
    runs = {}
    for run in args.runs:
        path = Path(run) / "metrics.jsonl"
        if not path.is_file():
            runs[Path(run).name] = {"error": f"{path} missing (the run failed: see its log)"}
            continue
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if "pairs_per_s" in r]
        runs[Path(run).name] = {"pairs_per_s": [r["pairs_per_s"] for r in rows],
                                "epoch_seconds": [r["seconds"] for r in rows],
                                "checkpoint_s": [r.get("checkpoint_s") for r in rows],
                                "checkpoint_mib": rows[-1].get("checkpoint_mib") if rows else None,
                                "warm_pairs_per_s": rows[-1]["pairs_per_s"] if rows else None}
    return runs


def _loss_and_grads(model, state, images, tokens, pids, amp, device):
    model.load_state_dict(state)  # same weights and BN statistics for every precision
    model.zero_grad(set_to_none=True)
    with autocast(device, amp):
        out = model(images, tokens, pids)
    scale = 1024.0 if amp == "fp16" else 1.0  # fp16 gradients need a loss scale, as GradScaler gives them
    (out.loss * scale).backward()
    grads = torch.cat([p.grad.float().flatten() / scale for p in model.parameters() if p.grad is not None])
    return {"loss": float(out.loss.detach()), **{k: float(v) for k, v in out.losses.items()}}, grads


def cmd_precision(args) -> dict:
    """One batch: loss parts per precision, and each gradient's cosine / relative norm vs fp32 on the device."""
    device = torch.device(args.device)
    model = build(args.arch, device).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    images, tokens, pids = batch_of(model, args.batch, device)
    modes = ["off", "bf16", "fp16"] if device.type == "cuda" else ["off", "bf16"]
    result, reference = {}, None
    for amp in modes:
        losses, grads = _loss_and_grads(model, state, images, tokens, pids, amp, device)
        if reference is None:
            reference = grads
        result[amp] = {"losses": losses, "finite": bool(torch.isfinite(grads).all()),
                       "grad_cosine_vs_fp32": float(torch.nn.functional.cosine_similarity(grads, reference, dim=0)),
                       "grad_norm_ratio_vs_fp32": float(grads.norm() / reference.norm())}
    if device.type == "cuda":  # the device's fp32 against the CPU's, on the tiny model
        tiny = build("tiny", device).train()
        tiny_state = {k: v.clone() for k, v in tiny.state_dict().items()}
        batch = batch_of(tiny, 16, device)
        gpu_losses, gpu_grads = _loss_and_grads(tiny, tiny_state, *batch, "off", device)
        tiny_cpu = build("tiny", torch.device("cpu")).train()
        cpu_losses, cpu_grads = _loss_and_grads(tiny_cpu, {k: v.cpu() for k, v in tiny_state.items()},
                                                *(t.cpu() for t in batch), "off", torch.device("cpu"))
        result["cuda_vs_cpu_fp32_tiny"] = {
            "losses_cuda": gpu_losses, "losses_cpu": cpu_losses,
            "grad_cosine": float(torch.nn.functional.cosine_similarity(gpu_grads.cpu(), cpu_grads, dim=0)),
            "max_loss_abs_diff": max(abs(gpu_losses[k] - cpu_losses[k]) for k in gpu_losses)}
    return {"arch": args.arch, "batch": args.batch, **result}


def cmd_sync(args) -> dict:
    """Two warm training steps (bf16, fused Adam) under set_sync_debug_mode('warn'): the warnings counted."""
    if args.device == "cpu":
        return {"skipped": "CUDA only (tests/test_sync_free.py counts host reads on CPU)"}
    device, model, optimizer = training_setup(args)
    batch = batch_of(model, args.batch, device)
    train_step(model, optimizer, *batch, "bf16")  # creates the optimiser state (not counted)
    synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(2):
                train_step(model, optimizer, *batch, "bf16")
        finally:
            torch.cuda.set_sync_debug_mode("default")
    synchronize(device)
    messages = sorted({str(w.message).splitlines()[0][:200] for w in caught})
    return {"fused_adam": bool(optimizer.defaults.get("fused")), "warnings": len(caught), "distinct": messages}


def cmd_memory(args) -> dict:
    """Peak allocated memory (GiB) of one bf16 training step at each batch size, whole and by gradient caching in
    chunks of 8 (train.py --chunk_size 8); 'oom' where it does not fit."""
    if args.device == "cpu":
        return {"skipped": "CUDA only"}
    device, model, optimizer = training_setup(args)
    peaks = {"whole": {}, "chunk_8": {}}
    for size in args.batches:
        batch = batch_of(model, size, device)
        for name, chunk_size in (("whole", None), ("chunk_8", 8)):
            try:
                train_step(model, optimizer, *batch, "bf16", chunk_size)  # optimiser state exists after the first
                synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                train_step(model, optimizer, *batch, "bf16", chunk_size)
                synchronize(device)
                peaks[name][str(size)] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            except torch.OutOfMemoryError:
                peaks[name][str(size)] = "oom"
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
        del batch
    return {"arch": args.arch, "amp": "bf16", "peak_gib": peaks}


@torch.no_grad()
def cmd_eval(args) -> dict:
    """Seconds to encode the gallery (uint8 -> model), encode the queries, and score both directions."""
    device = torch.device(args.device)
    model = build(args.arch, device).eval()
    images, captions = int(CUHK_TEST["images"] * args.eval_scale), int(CUHK_TEST["captions"] * args.eval_scale)
    size = model.config.clip.vision.image_size
    gallery_u8 = torch.randint(0, 256, (args.eval_batch, 3, *size), dtype=torch.uint8).pin_memory() \
        if device.type == "cuda" else torch.randint(0, 256, (args.eval_batch, 3, *size), dtype=torch.uint8)
    tokens = random_ids("clip", captions, 49408, torch.device("cpu"))

    def encode_gallery(start: int, n: int) -> torch.Tensor:  # one pinned uint8 batch, sent again and again
        return model.encode_images(to_model_input(gallery_u8[:n].to(device, non_blocking=True), "clip"))

    def encode_queries(start: int, n: int) -> torch.Tensor:
        return model.encode_texts(tokens[start:start + n].to(device, non_blocking=True))

    phases, features = {}, {}
    for phase, count, encode in (("encode_gallery", images, encode_gallery), ("encode_queries", captions, encode_queries)):
        with autocast(device, args.amp):
            encode(0, min(count, args.eval_batch))  # warm-up (cuDNN's choice, the allocator)
        synchronize(device)
        started, parts = time.perf_counter(), []
        for start in range(0, count, args.eval_batch):
            with autocast(device, args.amp):
                parts.append(encode(start, min(args.eval_batch, count - start)).float())
        synchronize(device)
        phases[phase] = round(time.perf_counter() - started, 3)
        features[phase] = torch.cat(parts)
    gallery_pids = torch.arange(images, device=device) % CUHK_TEST["ids"]
    query_pids = torch.arange(captions, device=device) % CUHK_TEST["ids"]
    started = time.perf_counter()
    for mode in ("concat", "global"):
        q, g = retrieval_features(features["encode_queries"], mode), retrieval_features(features["encode_gallery"], mode)
        evaluate_retrieval(q, g, query_pids, gallery_pids)
        evaluate_retrieval(g, q, gallery_pids, query_pids)
    synchronize(device)
    phases["metrics"] = round(time.perf_counter() - started, 3)
    return {"arch": args.arch, "amp": args.amp, "images": images, "captions": captions, "batch": args.eval_batch,
            "seconds": phases, "total_s": round(sum(phases.values()), 3)}


def cmd_checkpoint(args) -> dict:
    """train.py's save_files for an epoch that is the best so far: old (last.pt + best.pt written) vs now."""
    device = torch.device(args.device)
    model = build(args.arch, device).train()
    optimizer, _ = build_optimizer(model)
    train_step(model, optimizer, *batch_of(model, 4, device), "off")  # Adam's state exists, as in a real run
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "history": []}
    with tempfile.TemporaryDirectory(dir=args.scratch) as folder:
        folder = Path(folder)
        started = time.perf_counter()
        for name in ("best.pt", "last.pt"):  # before issue 11: two full writes
            save_checkpoint(state, folder / name)
        two_writes = time.perf_counter() - started
        size = (folder / "last.pt").stat().st_size / 2**20
        history = [{"epoch": 1}]
        save_files(folder, state, best=True, history=history)
    return {"arch": args.arch, "mib": round(size, 1), "two_writes_s": round(two_writes, 3),
            "one_write_and_link_s": history[0]["checkpoint_s"]}


def cmd_summary(args) -> dict:
    """Every OUT/<step>.json (and OUT/status.txt's step results) in one OUT/summary.json."""
    out = Path(args.out)
    summary = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if p.name != "summary.json"}
    status = out / "status.txt"
    if status.is_file():
        summary["steps"] = dict(line.split(maxsplit=1) for line in status.read_text().splitlines() if line.strip())
    return summary


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["env", "throughput", "precision", "sync", "memory", "eval", "checkpoint",
                                            "summary"])
    parser.add_argument("runs", nargs="*", help="throughput: train.py output folders")
    parser.add_argument("--out", required=True, help="folder for <command>.json")
    cuda = torch.cuda.is_available()
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--arch", choices=["vit_b16", "tiny"], default="vit_b16" if cuda else "tiny")
    parser.add_argument("--batch", type=int, default=32, help="precision and sync: pairs per batch")
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 64, 128], help="memory: batch sizes")
    parser.add_argument("--amp", default="bf16", choices=["off", "bf16", "fp16"], help="eval: autocast mode")
    parser.add_argument("--eval_batch", type=int, default=256)
    parser.add_argument("--eval_scale", type=float, default=1.0, help="eval: fraction of the CUHK-PEDES test size")
    parser.add_argument("--scratch", default=None, help="checkpoint: folder to write in (default: the temp folder)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    started = time.perf_counter()
    result = globals()[f"cmd_{args.command}"](args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.command != "summary":
        result = {**result, "probe_seconds": round(time.perf_counter() - started, 1)} if isinstance(result, dict) else result
    target = out / f"{args.command}.json"
    target.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result)[:2000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
