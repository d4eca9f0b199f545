"""Train CFine on a processed benchmark (bash data.sh first). Runs unchanged under torchrun (DDP).

    python train.py --config configs/cuhk_pedes.json --data_root processed_data --output_dir runs/cuhk
    python train.py --resume runs/cuhk/last.pt
    torchrun --standalone --nproc_per_node 4 train.py --config configs/cuhk_pedes.json --batch_size 8
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import clip
from datasets.base import DataError
from datasets.build import available_splits, build_eval_data, build_train_loader
from datasets.transforms import to_model_input
from models.cfine import CFine
from models.config import CFineConfig
from models.gather import convert_to_global_bn
from models.optim import build_optimizer
from models.tokenization import caption_tokenizer
from utils import distributed
from utils.checkpoint import atomic_write, load_checkpoint, save_checkpoint, write_json
from utils.evaluation import encode_split, format_table, score_split
from utils.training import NonFiniteGuard, StopRequest, autocast, resolve_amp, rng_state, seed_everything, set_rng_state

# Flags a resumed run takes from its checkpoint, whatever the command line says (they define the run).
RUN_DEFINING = ("dataset", "text_encoder", "clip", "clip_arch", "image_size", "mean_std", "batch_size", "seed", "lr_head", "lr_image",
                "lr_text", "wd_image", "warmup_epochs", "warmup_start", "milestones", "gamma", "cmpm_weights",
                "cmpc_weights", "diversity_weight", "ranking_weight", "margin", "gather_features", "sync_bn")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train CFine (text-to-image person retrieval)", add_help=True)
    parser.add_argument("--config", help="JSON file in configs/ whose keys are these flags; explicit flags override it")
    parser.add_argument("--dataset", default="CUHK-PEDES", help="CUHK-PEDES, ICFG-PEDES or RSTPReid")
    parser.add_argument("--data_root", default=None,
                        help="folder that data.sh wrote <dataset>/ into (default: processed_data; on --resume: the run's)")
    parser.add_argument("--clip", default="ViT-B/16",
                        help="pretrained CLIP: a released name (ViT-B/16, ...), a checkpoint path, or 'none' for random weights")
    parser.add_argument("--clip_arch", default="vit_b16", choices=["vit_b16", "tiny"],
                        help="architecture built when --clip none (tiny: the CPU demo's small CLIP-shaped model)")
    parser.add_argument("--text_encoder", default="clip", choices=["clip", "bert"],
                        help="clip: CLIP's text tower, D=512 (default); bert: the authors' release, BERT-base text and "
                             "unprojected 768-d image tokens (needs --bert and `pip install -r requirements-bert.txt`)")
    parser.add_argument("--bert", default=None,
                        help="with --text_encoder bert: a folder holding bert-base-uncased in Hugging Face layout "
                             "(config.json, vocab.txt, model.safetensors or pytorch_model.bin); only to start training")
    parser.add_argument("--output_dir", default=None, help="default: runs/cfine; on --resume: the checkpoint's folder")
    parser.add_argument("--image_size", type=int, nargs=2, default=[224, 224], metavar=("H", "W"))
    parser.add_argument("--mean_std", default="clip", choices=["clip", "imagenet"], help="image normalisation")
    parser.add_argument("--batch_size", type=int, default=32,
                        help="per process: under torchrun the global batch is batch_size x processes")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--lr_head", type=float, default=1e-4, help="new modules, BN and the CMPC classifier")
    parser.add_argument("--lr_image", type=float, default=1e-5)
    parser.add_argument("--lr_text", type=float, default=1e-5)
    parser.add_argument("--wd_image", type=float, default=4e-5)
    parser.add_argument("--warmup_epochs", type=int, default=10)
    parser.add_argument("--warmup_start", type=float, default=0.01)
    parser.add_argument("--milestones", type=int, nargs="*", default=[20, 25, 35])
    parser.add_argument("--gamma", type=float, default=0.1)
    loss = parser.add_argument_group("CFine loss weights (defaults: the spec's; for ablations and the from-scratch demo)")
    loss.add_argument("--cmpm_weights", type=float, nargs=3, default=[1.0, 1.0, 0.1], metavar=("GLOBAL", "LG1", "LG2"))
    loss.add_argument("--cmpc_weights", type=float, nargs=3, default=[1.0, 1.0, 1.0], metavar=("GLOBAL", "LG1", "LG2"))
    loss.add_argument("--diversity_weight", type=float, default=0.2)
    loss.add_argument("--ranking_weight", type=float, default=10.0)
    loss.add_argument("--margin", type=float, default=0.2)
    ddp = parser.add_argument_group("several processes (torchrun); no effect in a single process")
    ddp.add_argument("--gather_features", action="store_true",
                     help="CMPM and the ranking loss (with its CFR/FCD similarities) see the global batch through a "
                          "gradient-preserving all-gather; default: each process uses its own batch")
    ddp.add_argument("--sync_bn", action="store_true",
                     help="the BN bottlenecks normalise with the global batch's statistics (with --gather_features: "
                          "the same loss and update as one process on the whole global batch)")
    parser.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
                        help="auto: bf16 on GPUs that support it, fp16 (with a GradScaler) on older GPUs, off on CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=None,
                        help="data loader processes per training process (default: the node's cores shared among its "
                             "training processes, one kept for each, at most 8)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--eval_every", type=int, default=1, help="evaluate every N epochs (and after the last)")
    parser.add_argument("--eval_batch_size", type=int, default=128)
    parser.add_argument("--eval_at_start", action="store_true",
                        help="also evaluate the model before training (recorded as epoch 0: the untrained baseline)")
    parser.add_argument("--resume", help="a last.pt/best.pt written by train.py: continue that run exactly")
    parser.add_argument("--max_nonfinite", type=int, default=50, help="abort after this many non-finite losses in a row")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars (logs only)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Defaults < --config file < explicit flags."""
    parser = get_args_parser()
    first, _ = parser.parse_known_args(argv)
    if first.config:
        path = Path(first.config)
        try:
            values = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            parser.error(f"--config {path}: {error}")
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            parser.error(f"--config {path}: unknown keys {unknown}")
        parser.set_defaults(**values)
    return parser.parse_args(argv)


def build_model(args: argparse.Namespace, num_classes: int) -> CFine:
    """CFine with pretrained CLIP weights (--clip NAME|PATH) or random ones (--clip none); in bert mode the
    image tower alone (unprojected) and BERT from --bert (spec §9)."""
    image_size = tuple(args.image_size)
    pretrained = None
    if args.clip.lower() == "none":
        clip_config = clip.CLIPConfig.tiny(image_size) if args.clip_arch == "tiny" else clip.CLIPConfig.vit_b16(image_size)
    else:
        try:
            pretrained, clip_config = clip.load(args.clip, image_size=image_size)
        except clip.CheckpointError as error:
            raise SystemExit(f"--clip: {error}") from None
    text = {}
    bert_weights = text_vocab = None
    if getattr(args, "text_encoder", "clip") == "bert":
        bert_weights, text_vocab, text = load_bert_for_training(args.bert)
        clip_config = clip_config.vision_only()
        if text["bert"].get("hidden_size") != clip_config.vision.width:
            raise SystemExit(f"--bert {args.bert}: hidden size {text['bert'].get('hidden_size')} differs from the image "
                             f"tokens' width {clip_config.vision.width}; spec §9 pairs BERT-base (768) with ViT-B/16 (768)")
    model = CFine(CFineConfig(
        clip=clip_config, num_classes=num_classes, cmpm_weights=tuple(args.cmpm_weights),
        cmpc_weights=tuple(args.cmpc_weights), diversity_weight=args.diversity_weight,
        ranking_weight=args.ranking_weight, margin=args.margin, **text), text_vocab=text_vocab)
    if pretrained is not None:
        model.load_clip_weights(pretrained)
    if bert_weights is not None:
        model.bert.load_state_dict(bert_weights.state_dict(), strict=True)
    return model


def load_bert_for_training(folder: str | None):
    """(pretrained BertModel, vocab.txt text, CFineConfig text fields) from a --bert folder; clear errors."""
    from models.bert_text import BertFolderError, load_pretrained_bert, read_lower_case

    if not folder:
        raise SystemExit("--text_encoder bert needs --bert FOLDER: bert-base-uncased in Hugging Face layout "
                         "(config.json, vocab.txt, model.safetensors or pytorch_model.bin)")
    try:
        weights, architecture = load_pretrained_bert(folder)
        vocab = (Path(folder) / "vocab.txt").read_text(encoding="utf-8")
        lower_case = read_lower_case(Path(folder))
    except BertFolderError as error:
        raise SystemExit(str(error)) from None
    return weights, vocab, {"text_encoder": "bert", "bert": architecture, "bert_lower_case": lower_case}


def training_tokenizer(args: argparse.Namespace, resume_state: dict | None):
    """The caption tokeniser of the run: the checkpoint's (resume), else --text_encoder's (with --bert's vocab)."""
    if resume_state is not None:
        config = CFineConfig.from_dict(resume_state["config"])
        return caption_tokenizer(config.text_encoder, resume_state.get("text_vocab"), config.bert_lower_case,
                                 config.bert_max_length)
    if getattr(args, "text_encoder", "clip") == "bert":
        from models.bert_text import BertFolderError, check_bert_folder, read_lower_case

        if not args.bert:
            raise SystemExit("--text_encoder bert needs --bert FOLDER (bert-base-uncased in Hugging Face layout)")
        try:
            folder = check_bert_folder(args.bert)
            return caption_tokenizer("bert", (folder / "vocab.txt").read_text(encoding="utf-8"), read_lower_case(folder))
        except BertFolderError as error:
            raise SystemExit(str(error)) from None
    return caption_tokenizer("clip")


def agree(loss: torch.Tensor, stop: StopRequest) -> tuple[torch.Tensor, bool | None]:
    """DDP: (sum of the ranks' losses, whether any rank was asked to stop) in one all-reduce; alone: (loss, None).

    The sum is non-finite if any rank's loss is, so all ranks skip the same steps and stop after the same
    step (a rank that skipped alone would leave the others waiting in DDP's gradient all-reduce).
    """
    if distributed.get_world_size() == 1:
        return loss, None
    flags = torch.stack([loss.detach().float(), torch.tensor(float(stop.requested), device=loss.device)])
    flags = distributed.all_reduce_sum(flags)
    return flags[0], bool(flags[1] > 0)


def train_one_epoch(model, loader, optimizer, scaler, device, amp, epoch, start_step, guard, stop, progress):
    """One pass over the epoch's remaining batches; returns (loss parts averaged over steps and ranks, pairs,
    finished batches, stopped)."""
    model.train()
    sums: dict[str, torch.Tensor] = {}
    counted = pairs = 0
    step = start_step
    bar = tqdm(loader, desc=f"epoch {epoch + 1}", initial=start_step, total=start_step + len(loader),
               disable=not progress, dynamic_ncols=True)
    started = time.perf_counter()
    for batch in bar:
        images = to_model_input(batch["images"].to(device, non_blocking=True), loader.dataset.mean_std,
                                batch["flips"].to(device, non_blocking=True))
        tokens = batch["tokens"].to(device, non_blocking=True)
        pids = batch["pids"].to(device, non_blocking=True)
        with autocast(device, amp):
            out = model(images, tokens, pids)
        step += 1
        optimizer.zero_grad(set_to_none=True)
        checked_loss, stopping = agree(out.loss, stop)
        if guard.skip(checked_loss):
            if distributed.is_main_process():
                print(f"epoch {epoch + 1} step {step}: non-finite loss, step skipped "
                      f"({guard.in_a_row} in a row, {guard.total} in total)", file=sys.stderr)
            if guard.diverged:
                return _rank_means(sums, counted), pairs, step, "diverged"
        else:
            scaler.scale(out.loss).backward()
            scaler.step(optimizer)
            scaler.update()
            parts = {"loss": out.loss.detach(), **{f"loss_{k}": v for k, v in out.losses.items()}}
            for key, value in parts.items():
                sums[key] = sums.get(key, 0) + value.float()
            counted += 1
        pairs += images.shape[0]
        if progress and (step % 10 == 0 or step == start_step + 1):
            means = _means(sums, counted)
            rate = pairs * distributed.get_world_size() / max(time.perf_counter() - started, 1e-9)
            bar.set_postfix({k.removeprefix("loss_"): f"{v:.3f}" for k, v in means.items()} | {"pairs/s": f"{rate:.0f}"})
        if stop.requested if stopping is None else stopping:
            return _rank_means(sums, counted), pairs, step, "signal"
    return _rank_means(sums, counted), pairs, step, None


def metrics_row(results: dict, split: str) -> dict:
    """The metrics.jsonl fields of one evaluation: t2i (concatenated feature), t2i global-only, and i2t."""
    return {"eval_split": split, **results["t2i"], **{f"{k}_global": v for k, v in results["t2i_global"].items()},
            **{f"i2t_{k}": v for k, v in results["i2t"].items()}}


def _means(sums: dict[str, torch.Tensor], count: int) -> dict[str, float]:
    return {k: float(v) / max(count, 1) for k, v in sums.items()}


def _rank_means(sums: dict[str, torch.Tensor], count: int) -> dict[str, float]:
    """Per-step means averaged over ranks: a collective (all ranks skip the same steps, so keys and counts agree)."""
    if sums:
        totals = distributed.all_reduce_sum(torch.stack(list(sums.values()))) / distributed.get_world_size()
        sums = dict(zip(sums, totals))
    return _means(sums, count)


def main(args: argparse.Namespace) -> int:
    info, device = distributed.init_distributed(args.device)
    resume_state = None
    if args.resume:
        try:
            resume_state = load_checkpoint(args.resume)
        except Exception as error:
            raise SystemExit(f"--resume: {error}") from None
        for key in RUN_DEFINING:  # the run's own settings win over the command line
            if key in resume_state["args"]:
                setattr(args, key, resume_state["args"][key])
        args.data_root = args.data_root or resume_state["args"].get("data_root")
        args.output_dir = args.output_dir or str(Path(args.resume).parent)
    args.data_root = args.data_root or "processed_data"
    args.output_dir = args.output_dir or "runs/cfine"
    amp = resolve_amp(args.amp, device)
    seed_everything(args.seed)
    output_dir = Path(args.output_dir)
    progress = info.is_main and not args.no_progress
    workers = distributed.loader_workers(args.workers, info)

    processed = Path(args.data_root) / args.dataset
    tokenizer = training_tokenizer(args, resume_state)
    try:
        splits = available_splits(processed)
        eval_split = "val" if "val" in splits else "test"
        loader = build_train_loader(processed, image_size=tuple(args.image_size), batch_size=args.batch_size,
                                    workers=workers, mean_std=args.mean_std, seed=args.seed,
                                    num_replicas=info.world_size, rank=info.rank, tokenizer=tokenizer)
        eval_data = build_eval_data(processed, eval_split, image_size=tuple(args.image_size),
                                    batch_size=args.eval_batch_size, workers=workers, mean_std=args.mean_std,
                                    tokenizer=tokenizer)
    except (DataError, ValueError) as error:  # processed data missing or damaged, batch larger than the data
        raise SystemExit(f"--data_root/--dataset: {error}") from None
    if info.is_main and eval_split == "test":
        print(f"{args.dataset} has no val split: evaluating and selecting best.pt on the TEST split")

    if resume_state is not None:
        model = CFine(CFineConfig.from_dict(resume_state["config"]), text_vocab=resume_state.get("text_vocab"))
    else:
        model = build_model(args, loader.dataset.num_classes)
    model.to(device)
    if args.sync_bn:
        convert_to_global_bn(model)
    model.head.gather_features = args.gather_features
    optimizer, scheduler = build_optimizer(
        model, lr_head=args.lr_head, lr_image=args.lr_image, lr_text=args.lr_text, wd_image=args.wd_image,
        warmup_epochs=args.warmup_epochs, warmup_start=args.warmup_start, milestones=tuple(args.milestones),
        gamma=args.gamma)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")

    start_epoch, start_step, history, best = 0, 0, [], {"R1": -1.0, "epoch": None}
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        scaler.load_state_dict(resume_state["scaler"])
        set_rng_state(resume_state["rng"])
        start_epoch, start_step = resume_state["epoch"], resume_state["step_in_epoch"]
        history, best = resume_state["history"], resume_state["best"]
        saved_world = resume_state.get("world_size", 1)
        if saved_world != info.world_size and start_step > 0:
            raise SystemExit(f"--resume {args.resume}: saved by {saved_world} process(es) in the middle of epoch "
                             f"{start_epoch + 1}, whose batches depend on the process count; resume it with "
                             f"{saved_world} process(es) (torchrun --nnodes x --nproc_per_node), or resume from a "
                             "checkpoint saved at the end of an epoch")
        if info.is_main:
            print(f"resumed {args.resume}: epoch {start_epoch + 1}, after {start_step} steps of it")
            if saved_world != info.world_size:
                print(f"note: trained so far by {saved_world} process(es), now {info.world_size}: the global batch "
                      f"changes from {args.batch_size * saved_world} to {args.batch_size * info.world_size}")
    ddp_model = distributed.wrap_ddp(model, device)
    if info.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_json(output_dir / "config.json", {"args": vars(args), "model": model.config.to_dict()})
        steps = loader.sampler.batches_per_epoch
        print(f"{args.dataset}: {len(loader.dataset)} training pairs, {loader.dataset.num_classes} ids, "
              f"{steps} steps/epoch, global batch {args.batch_size * info.world_size} "
              f"({args.batch_size} per process x {info.world_size} process(es)); device {device}, amp {amp}; "
              f"evaluating on {eval_split}")
        if info.enabled:
            print(f"DDP over {info.world_size} processes ({'NCCL' if device.type == 'cuda' else 'Gloo'}): losses on "
                  f"{'the global batch (--gather_features)' if args.gather_features else 'each process batch'}, "
                  f"BN statistics {'of the global batch (--sync_bn)' if args.sync_bn else 'per process'}")

    def checkpoint(epoch: int, step_in_epoch: int) -> dict:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "epoch": epoch, "step_in_epoch": step_in_epoch, "rng": rng_state(),
                "config": model.config.to_dict(), "text_vocab": model.text_vocab, "args": vars(args), "history": history, "best": best,
                "eval_split": eval_split, "world_size": info.world_size}

    if args.eval_at_start and start_epoch == 0 and start_step == 0 and not history:
        results = score_split(encode_split(model, eval_data, device, amp, args.eval_batch_size, progress))
        history.append({"epoch": 0, **metrics_row(results, eval_split)})
        if info.is_main:
            print(f"before training, on {eval_split}:\n{format_table(results)}")

    guard = NonFiniteGuard(args.max_nonfinite)
    with StopRequest() as stop:
        for epoch in range(start_epoch, args.epochs):
            loader.sampler.set_epoch(epoch, start_batch=start_step)
            started = time.perf_counter()
            losses, pairs, step, interrupted = train_one_epoch(
                ddp_model, loader, optimizer, scaler, device, amp, epoch, start_step, guard, stop, progress)
            if interrupted == "diverged":
                raise SystemExit(f"training diverged: {guard.limit} non-finite losses in a row at epoch {epoch + 1}; "
                                 f"{output_dir / 'last.pt'} holds the last good state (lower the learning rates or use --amp off)")
            if interrupted == "signal":
                if info.is_main:
                    save_checkpoint(checkpoint(epoch, step), output_dir / "last.pt")
                    launcher = "torchrun ... train.py" if info.enabled else "python train.py"
                    print(f"stopped by {stop.signal_name or 'a signal to another process'} at epoch {epoch + 1}, "
                          f"step {step}; state saved to {output_dir / 'last.pt'}. Resume with: {launcher} --resume "
                          f"{output_dir / 'last.pt'}", file=sys.stderr)
                # Ranks exit once last.pt is written: torchrun stops a group as soon as one rank exits non-zero.
                distributed.cleanup()
                return 130 if stop.signal_name == "SIGINT" else 143
            start_step = 0
            lrs = {f"lr_{g['name']}": g["lr"] for g in optimizer.param_groups}
            scheduler.step()
            row = {"epoch": epoch + 1, **losses, **lrs, "skipped_steps": guard.total,
                   "seconds": round(time.perf_counter() - started, 3),
                   "pairs_per_s": round(pairs * info.world_size / max(time.perf_counter() - started, 1e-9), 2)}
            evaluate = (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs
            distributed.broadcast_buffers(model)  # every rank now holds what rank 0 saves below
            if evaluate:
                results = score_split(encode_split(model, eval_data, device, amp, args.eval_batch_size, progress))
                row.update(metrics_row(results, eval_split))
                if info.is_main:
                    print(f"epoch {epoch + 1} on {eval_split}:\n{format_table(results)}")
            history.append(row)
            improved = evaluate and row["R1"] > best["R1"]
            if improved:
                best = {"R1": row["R1"], "epoch": epoch + 1}
            if info.is_main:
                state = checkpoint(epoch + 1, 0)
                if improved:
                    save_checkpoint(state, output_dir / "best.pt")
                save_checkpoint(state, output_dir / "last.pt")
                atomic_write(output_dir / "metrics.jsonl", lambda f: f.write("".join(json.dumps(r) + "\n" for r in history).encode()))
                print(json.dumps({k: v for k, v in row.items() if not k.startswith("lr_")}))
    if info.is_main:
        print(f"done: best {eval_split} R@1 {best['R1']:.2f} at epoch {best['epoch']} ({output_dir / 'best.pt'})")
    distributed.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(distributed.run(main, parse_args()))
