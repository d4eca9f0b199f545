"""Train CFine on a processed benchmark (bash data.sh first). Runs unchanged under torchrun (DDP).

    python train.py --config configs/cuhk_pedes.json --data_root processed_data --output_dir runs/cuhk
    python train.py --resume runs/cuhk/last.pt              # continue that run exactly, with its own settings
    python train.py --resume runs/cuhk/last.pt --epochs 60  # ... and extend it to 60 epochs
    torchrun --standalone --nproc_per_node 4 train.py --config configs/cuhk_pedes.json --batch_size 8

Every setting, what it allows, its default and what --resume does with it: engine/settings.py.
A new run needs an empty --output_dir (or --overwrite).
"""
from __future__ import annotations

# ruff: noqa: E402 (the flags are parsed before the heavy imports: see below)
import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from engine import settings

# What --overwrite deletes (and tb/'s event files); train.log is started afresh.
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "config.json", "environment.json", "held_out_ids.json")


def get_args_parser() -> argparse.ArgumentParser:
    """Flags built from engine/settings.py's table (TRAIN_SETTINGS)."""
    return settings.get_args_parser("Train CFine (text-to-image person retrieval)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Defaults < --config file < explicit flags, every value checked against the settings table."""
    return settings.parse(get_args_parser(), argv)


# Run as a script, train.py reads its flags before the imports below, which load torch (over 10 s): --help and a
# mistyped flag answer at once. Imported as a module (tests, benchmarks), it defines everything as usual.
if __name__ == "__main__":
    ARGS = parse_args()

import torch
from tqdm import tqdm

import clip
from datasets.base import DataError
from datasets.build import EvalData, available_splits, build_eval_data, build_train_loader, loader_workers
from datasets.holdout import carve_validation_ids
from datasets.processed import check_same_data, data_identity, load_split
from datasets.transforms import to_model_input
from engine import run_log
from engine.control import StopRequest, TrainingStopped, rng_state, seed_everything, set_rng_state
from engine.environment import record_environment
from engine.grad_cache import forward_backward
from engine.step_guard import StepGuard, TrainingDiverged
from evaluation.encode import encode_split, score_split
from models.cfine import CFine
from models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from models.config import CFineConfig
from models.gather import convert_to_global_bn
from models.optim import build_optimizer
from models.precision import autocast, compiled, resolve_amp
from models.tokenization import CaptionTokenizer, caption_tokenizer
from utils import distributed
from utils.files import atomic_write, check_writable_folder, folder_contents, remove_stale_temp_files, write_json


def build_model(args: argparse.Namespace, num_classes: int) -> CFine:
    """CFine with pretrained CLIP weights (--clip NAME|PATH) or random ones (--clip none); in bert mode the
    image tower alone (unprojected) and BERT from --bert (docs/method.md §9)."""
    image_size = tuple(args.image_size)
    pretrained = None
    if args.clip.lower() == "none":
        clip_config = clip.CLIPConfig.tiny(image_size) if args.clip_arch == "tiny" else clip.CLIPConfig.vit_b16(image_size)
    else:
        try:
            pretrained, clip_config = clip.load(args.clip, image_size=image_size)
        except clip.CheckpointError as error:
            raise SystemExit(f"--clip: {error}") from None
        if any(side % clip_config.vision.patch_size for side in image_size):
            raise SystemExit("train.py: error: " + settings.image_size_problem(
                list(image_size), clip_config.vision.patch_size, args.clip))
    text, bert_weights, text_vocab = {}, None, None
    if args.text_encoder == "bert":
        bert_weights, text_vocab, text = load_bert_for_training(args.bert)
        clip_config = clip_config.vision_only()
        if text["bert"].get("hidden_size") != clip_config.vision.width:
            raise SystemExit(f"--bert {args.bert}: hidden size {text['bert'].get('hidden_size')} differs from the image "
                             f"tokens' width {clip_config.vision.width}; docs/method.md §9 pairs BERT-base (768) with ViT-B/16 (768)")
    model = CFine(CFineConfig(
        clip=clip_config, num_classes=num_classes, cmpm_weights=tuple(args.cmpm_weights),
        cmpc_weights=tuple(args.cmpc_weights), diversity_weight=args.diversity_weight,
        ranking_weight=args.ranking_weight, margin=args.margin, **text), text_vocab=text_vocab)
    if pretrained is not None:
        model.load_clip_weights(pretrained)
    if bert_weights is not None:
        model.bert.load_state_dict(bert_weights.state_dict(), strict=True)
    return model


def load_bert_for_training(folder: str):
    """(pretrained BertModel, vocab.txt's text, CFineConfig's text fields) from a --bert folder; clear errors."""
    from models.text_encoders.bert import BertFolderError, load_pretrained_bert, read_vocabulary  # bert mode only

    try:
        weights, architecture = load_pretrained_bert(folder)
        vocab, lower_case = read_vocabulary(folder)
    except BertFolderError as error:
        raise SystemExit(str(error)) from None
    return weights, vocab, {"text_encoder": "bert", "bert": architecture, "bert_lower_case": lower_case}


def run_tokenizer(args: argparse.Namespace, resumed: dict | None) -> CaptionTokenizer:
    """The run's caption tokeniser: the checkpoint's (resume), else --text_encoder's (with --bert's vocab.txt)."""
    if resumed is not None:
        config = CFineConfig.from_dict(resumed["config"])
        return caption_tokenizer(config.text_encoder, resumed.get("text_vocab"), config.bert_lower_case,
                                 config.bert_max_length)
    if args.text_encoder == "bert":
        from models.text_encoders.bert import BertFolderError, read_vocabulary  # bert mode only

        try:
            return caption_tokenizer("bert", *read_vocabulary(args.bert))
        except BertFolderError as error:
            raise SystemExit(str(error)) from None
    return caption_tokenizer("clip")


@dataclass
class TrainData:
    """The training loader, the split that evaluates (and selects best.pt), and what identifies the data.

    eval_split: "val" (the dataset's), "val_carved" (training ids held out, `held_out_ids`) or "test" (--select_on
    test). The held-out ids also sit in `identity` (the checkpoint's "data" record), so --resume and test.py
    rebuild the same split.
    """

    loader: torch.utils.data.DataLoader
    eval_data: EvalData
    eval_split: str
    identity: dict
    held_out_ids: list[int] = field(default_factory=list)


def selection_split(args: argparse.Namespace, processed: Path, resumed: dict | None) -> tuple[str, list[int]]:
    """(eval_split, held-out training ids): the dataset's val, else ids carved from train (from --seed, or the
    resumed run's own), or test when --select_on test."""
    if args.select_on == "test" or (resumed or {}).get("eval_split") == "test":  # runs before --select_on did too
        return "test", []
    if "val" in available_splits(processed):
        return "val", []
    if resumed is not None:
        return "val_carved", list((resumed.get("data") or {}).get("held_out_ids") or [])
    pids = [r["pid"] for r in load_split(processed, "train").records]
    return "val_carved", carve_validation_ids(pids, args.seed)


def build_data(args: argparse.Namespace, info: distributed.DistInfo, tokenizer: CaptionTokenizer,
               resumed: dict | None = None) -> TrainData:
    """Training pairs of --dataset (held-out ids left out) and the split that selects best.pt (selection_split)."""
    processed = Path(args.data_root) / args.dataset
    workers = loader_workers(args.workers, info.local_world_size)
    try:
        eval_split, held_out = selection_split(args, processed, resumed)
        if eval_split == "val_carved" and not held_out:
            raise SystemExit(f"--resume {args.resume}: the run selects on a validation split carved from the "
                             "training ids, but the checkpoint does not record them (data.held_out_ids)")
        loader = build_train_loader(processed, image_size=tuple(args.image_size), batch_size=args.batch_size,
                                    workers=workers, mean_std=args.mean_std, seed=args.seed,
                                    num_replicas=info.world_size, rank=info.rank, tokenizer=tokenizer,
                                    held_out_ids=held_out)
        eval_data = build_eval_data(processed, "test" if eval_split == "test" else "val",
                                    image_size=tuple(args.image_size), batch_size=args.eval_batch_size,
                                    workers=workers, mean_std=args.mean_std, tokenizer=tokenizer,
                                    held_out_ids=held_out)
        identity = data_identity(processed) | ({"held_out_ids": held_out} if held_out else {})
        return TrainData(loader, eval_data, eval_split, identity, held_out)
    except (DataError, ValueError) as error:  # processed data missing or damaged, batch larger than the data
        raise SystemExit(f"--data_root/--dataset: {error}") from None


@dataclass
class RunState:
    """Where the run stands: finished epochs, finished steps of the next one, the metrics so far, the best epoch."""

    epoch: int = 0
    step_in_epoch: int = 0
    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"R1": -1.0, "epoch": None})
    saved: Path | None = None  # the checkpoint that holds this run's latest good state
    skipped_steps: int = 0  # steps undone for non-finite values, in all and in a row (StepGuard's counts)
    nonfinite_in_a_row: int = 0

    def finish_epoch(self, row: dict) -> bool:
        """Record a finished epoch's row; True if its R@1 is the best so far (so best.pt is due)."""
        self.epoch, self.step_in_epoch = row["epoch"], 0
        self.history.append(row)
        improved = "R1" in row and row["R1"] > self.best["R1"]
        if improved:
            self.best = {"R1": row["R1"], "epoch": row["epoch"]}
        return improved


def read_resume(args: argparse.Namespace) -> dict:
    """The checkpoint to continue; args take its settings (engine/settings.py says which and how)."""
    try:
        state = load_checkpoint(args.resume)
        settings.apply_checkpoint(args, state["args"], args.resume)
    except CheckpointError as error:
        raise SystemExit(f"--resume: {error}") from None
    except settings.SettingError as error:
        raise SystemExit(f"train.py: error: {error}") from None
    return state


def check_resumed_data(args: argparse.Namespace, state: dict) -> None:
    """The data under --data_root must be the run's: same annotation and split sizes, as many training ids."""
    processed = Path(args.data_root) / args.dataset
    try:
        check_same_data(state.get("data"), processed, args.resume)
        train_ids = data_identity(processed)["splits"].get("train", {}).get("ids")
    except DataError as error:
        raise SystemExit(f"--data_root: {error}") from None
    classes = state["config"]["num_classes"]
    held_out = len((state.get("data") or {}).get("held_out_ids") or [])  # carved off as val: not classes
    if train_ids is None or train_ids - held_out != classes:
        held = f" ({held_out} of them held out as val)" if held_out else ""
        raise SystemExit(f"--data_root: {processed} has {train_ids} training identities{held}, but the run in "
                         f"{args.resume} has a classifier over {classes}: point --data_root at the data that run was "
                         "trained on")


def claim_output_dir(args: argparse.Namespace, info: distributed.DistInfo) -> Path:
    """The run's folder: the checkpoint's on --resume; a new run needs it empty unless --overwrite."""
    if args.output_dir is None:
        args.output_dir = str(Path(args.resume).parent if args.resume else
                              Path("runs") / args.dataset.lower().replace("-", "_"))
    output_dir = Path(args.output_dir)
    continuing = bool(args.resume) and Path(args.resume).resolve().parent == output_dir.resolve()
    if continuing and args.overwrite:
        raise SystemExit(f"--overwrite would delete the run that --resume {args.resume} continues; drop one of them")
    contents = folder_contents(output_dir) if info.is_main else []
    if contents and not continuing and not args.overwrite:
        listed = ", ".join(contents[:4]) + (", ..." if len(contents) > 4 else "")
        raise SystemExit(f"--output_dir {output_dir} is not empty ({listed}): pass --resume {output_dir / 'last.pt'} "
                         "to continue the run there, --overwrite to replace it, or choose another --output_dir")
    if info.is_main:
        try:
            check_writable_folder(output_dir)
        except OSError as error:
            raise SystemExit(f"--output_dir {output_dir}: cannot write there ({error})") from None
        remove_stale_temp_files(output_dir)  # left by a run killed while writing
    return output_dir


def restore_run(state: dict, model, optimizer, scheduler, scaler, args, info) -> RunState:
    """Load a checkpoint's model, optimiser, schedule, scaler and RNG states; the run's position and history."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    run = RunState(state["epoch"], state["step_in_epoch"], state["history"], state["best"], Path(args.resume),
                   state.get("skipped_steps", 0), state.get("nonfinite_in_a_row", 0))
    saved_world = state.get("world_size", 1)
    if saved_world != info.world_size and run.step_in_epoch > 0:
        raise SystemExit(f"--resume {args.resume}: saved by {saved_world} process(es) in the middle of epoch "
                         f"{run.epoch + 1}, whose batches depend on the process count; resume it with {saved_world} "
                         "process(es) (torchrun --nnodes x --nproc_per_node), or resume from a checkpoint saved at "
                         "the end of an epoch")
    if info.is_main:
        print(f"resumed {args.resume}: epoch {run.epoch + 1} of {args.epochs}, after {run.step_in_epoch} steps of it")
        if saved_world != info.world_size:
            print(f"note: trained so far by {saved_world} process(es), now {info.world_size}: the global batch "
                  f"changes from {args.batch_size * saved_world} to {args.batch_size * info.world_size}")
    return run


def make_checkpoint(model: CFine, optimizer, scheduler, scaler, guard: StepGuard, run: RunState,
                    args: argparse.Namespace, data: TrainData) -> dict:
    """One dict per checkpoint: what --resume continues from, and the config test.py rebuilds the model from."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "epoch": run.epoch, "step_in_epoch": run.step_in_epoch, "rng": rng_state(),
            "config": model.config.to_dict(), "text_vocab": model.text_vocab, "args": settings.as_dict(args), "history": run.history,
            "best": run.best, "eval_split": data.eval_split, "world_size": distributed.get_world_size(),
            "data": data.identity, "skipped_steps": guard.total, "nonfinite_in_a_row": guard.in_a_row}


def save_files(output_dir: Path, state: dict, *, best: bool = False, history: list[dict] | None = None) -> None:
    """last.pt (best.pt: a hard link to it), then metrics.jsonl, each atomically; a failure leaves every previous
    file valid. The checkpoint's write time and size go into the last history row (checkpoint_s, checkpoint_mib).

    best.pt is the same file as last.pt when the epoch is the best so far: written once, not twice (at ViT-B/16
    with Adam's state about 1.8 GiB), and `--resume best.pt` continues from it exactly as from last.pt.
    """
    try:
        started = time.perf_counter()
        save_checkpoint(state, output_dir / "last.pt")
        if best:
            link_file(output_dir / "last.pt", output_dir / "best.pt")
        if history:
            history[-1].update(checkpoint_s=round(time.perf_counter() - started, 3),
                               checkpoint_mib=round((output_dir / "last.pt").stat().st_size / 2**20, 1))
        if history is not None:
            atomic_write(output_dir / "metrics.jsonl", lambda f: f.write("".join(json.dumps(r) + "\n" for r in history).encode()))
    except (CheckpointError, OSError) as error:
        raise SystemExit(f"{error}" if isinstance(error, CheckpointError) else
                         f"{output_dir / 'metrics.jsonl'}: could not be written ({error}); free disk space") from None


def link_file(source: Path, target: Path) -> None:
    """target becomes another name of source's file (a copy where the file system has no hard links), atomically."""
    temporary = target.with_name(f".{target.name}.hardlink.tmp")  # a stale-temp name (utils/files.py)
    temporary.unlink(missing_ok=True)
    try:
        os.link(source, temporary)
    except OSError:
        shutil.copyfile(source, temporary)
    os.replace(temporary, target)


def start_output(output_dir: Path, args, model: CFine, data: TrainData, info, device, amp: str, epoch: int) -> None:
    """Rank 0: delete an overwritten run's files, write config.json, environment.json (and the held-out ids), say
    what will run and which split selects best.pt."""
    if args.overwrite:
        for name in RUN_FILES:
            (output_dir / name).unlink(missing_ok=True)
        for events in (output_dir / "tb").glob("events.out.tfevents.*"):
            events.unlink()
    write_json(output_dir / "config.json", {"args": settings.as_dict(args), "model": model.config.to_dict()})
    record_environment(output_dir / "environment.json", start_epoch=epoch, resumed_from=args.resume)
    if data.held_out_ids:
        write_json(output_dir / "held_out_ids.json", {"dataset": args.dataset, "seed": args.seed,
                                                       "held_out_ids": data.held_out_ids})
    print(f"{args.dataset}: {len(data.loader.dataset)} training pairs, {data.loader.dataset.num_classes} ids, "
          f"{data.loader.sampler.batches_per_epoch} steps/epoch, global batch {args.batch_size * info.world_size} "
          f"({args.batch_size} per process x {info.world_size} process(es)); device {device}, amp {amp}; "
          f"evaluating on {data.eval_split}; writing to {output_dir}")
    if args.chunk_size and args.chunk_size < args.batch_size:
        print(f"gradient caching: encoders run {args.chunk_size} pairs at a time (twice), the head and losses see the "
              f"whole batch of {args.batch_size}: the same step with less memory")
    elif args.chunk_size:
        print(f"--chunk_size {args.chunk_size} is the whole batch: the plain step, without gradient caching")
    if data.eval_split == "val_carved":
        print(f"{args.dataset} has no val split: {len(data.held_out_ids)} training ids held out as val (from seed "
              f"{args.seed}, listed in {output_dir / 'held_out_ids.json'}); best.pt is selected on them and the "
              "test split is not looked at during training")
    if data.eval_split == "test":
        print(f"WARNING: --select_on test: evaluating and selecting best.pt on the TEST split of {args.dataset}; "
              "its test numbers are not held-out results (recorded as eval_split 'test')", file=sys.stderr)
    if info.enabled:
        print(f"DDP over {info.world_size} processes ({'NCCL' if device.type == 'cuda' else 'Gloo'}): losses on "
              f"{'the global batch (--gather_features)' if args.gather_features else 'each process batch'}, "
              f"BN statistics {'of the global batch (--sync_bn)' if args.sync_bn else 'per process'}")


def train_one_epoch(model, loader, optimizer, scaler, guard: StepGuard, stop: StopRequest, *, device, amp: str,
                    epoch: int, start_step: int, progress: bool, chunk_size: int | None = None) -> dict:
    """One pass over the epoch's remaining batches: {"losses": parts averaged over kept steps and ranks, "pairs"}.

    chunk_size: gradient caching (engine/grad_cache.py), the same step with encoder memory for that many pairs.

    A step whose loss or updated weights are not finite is undone by the guard (TrainingDiverged after too many
    in a row); a stop request ends the epoch after the current step with TrainingStopped.
    """
    model.train()
    sums: dict[str, torch.Tensor] = {}
    kept = pairs = 0
    step = start_step
    bar = tqdm(loader, desc=f"epoch {epoch + 1}", initial=start_step, total=start_step + len(loader),
               disable=not progress, dynamic_ncols=True)
    started = time.perf_counter()
    for batch in bar:
        images, flips, tokens, pids = (batch[key].to(device, non_blocking=True)
                                       for key in ("images", "flips", "tokens", "pids"))
        images = to_model_input(images, loader.dataset.mean_std, flips)  # uint8 -> flipped, normalised float
        guard.save()
        optimizer.zero_grad(set_to_none=True)
        out = forward_backward(model, images, tokens, pids, precision=lambda: autocast(device, amp), scale=scaler.scale,
                               chunk_size=chunk_size)
        scaler.step(optimizer)
        scaler.update()
        step, pairs = step + 1, pairs + images.shape[0]
        loss_finite, weights_finite, stopping = guard.verdict(out.loss, stop.requested)
        if guard.accept(loss_finite, weights_finite):
            for key, value in {"loss": out.loss, **{f"loss_{k}": v for k, v in out.losses.items()}}.items():
                sums[key] = sums.get(key, 0) + value.detach().float()
            kept += 1
        elif distributed.is_main_process():
            what = "weights after the update, step undone" if loss_finite else "loss, step skipped"
            print(f"epoch {epoch + 1} step {step}: non-finite {what} ({guard.in_a_row} in a row, "
                  f"{guard.total} in total)", file=sys.stderr)
        if progress and (step % 10 == 0 or step == start_step + 1):
            rate = pairs * distributed.get_world_size() / max(time.perf_counter() - started, 1e-9)
            bar.set_postfix({k.removeprefix("loss_"): f"{float(v) / max(kept, 1):.3f}" for k, v in sums.items()}
                            | {"pairs/s": f"{rate:.0f}"})
        if stopping:
            raise TrainingStopped(step)
    return {"losses": _rank_means(sums, kept), "pairs": pairs}


def _rank_means(sums: dict[str, torch.Tensor], count: int) -> dict[str, float]:
    """Per-step means averaged over ranks: a collective (all ranks skip the same steps, so keys and counts agree)."""
    if sums:
        totals = distributed.all_reduce_sum(torch.stack(list(sums.values()))) / distributed.get_world_size()
        sums = dict(zip(sums, totals))
    return {k: float(v) / max(count, 1) for k, v in sums.items()}


def epoch_row(epoch: int, stats: dict, optimizer, guard: StepGuard, started: float) -> dict:
    """The metrics.jsonl row of a finished epoch, before evaluation: losses, learning rates, counts, speed."""
    seconds = time.perf_counter() - started
    return {"epoch": epoch + 1, **stats["losses"], **{f"lr_{g['name']}": g["lr"] for g in optimizer.param_groups},
            "skipped_steps": guard.total, "seconds": round(seconds, 3),
            "pairs_per_s": round(stats["pairs"] * distributed.get_world_size() / max(seconds, 1e-9), 2)}


def evaluate(model: CFine, data: TrainData, args, device, amp: str, progress: bool) -> dict:
    """Retrieval metrics on the evaluation split (docs/method.md §7), sharded over the processes."""
    return score_split(encode_split(model, data.eval_data, device, amp, args.eval_batch_size, progress, args.compile))


def metrics_row(results: dict, split: str) -> dict:
    """The metrics.jsonl fields of one evaluation: t2i (concatenated feature), t2i global-only, and i2t."""
    return {"eval_split": split, **results["t2i"], **{f"{k}_global": v for k, v in results["t2i_global"].items()},
            **{f"i2t_{k}": v for k, v in results["i2t"].items()}}


def main(args: argparse.Namespace) -> int:
    """Train; rank 0's console is copied to <output_dir>/train.log, and --tensorboard writes <output_dir>/tb/."""
    with contextlib.ExitStack() as closing:
        return train_run(args, closing)


def train_run(args: argparse.Namespace, closing: contextlib.ExitStack) -> int:
    resumed = read_resume(args) if args.resume else None  # from here on args hold the run's settings
    if resumed is not None and resumed["epoch"] >= args.epochs:
        print(f"{args.resume}: the run finished all {args.epochs} epochs; pass --epochs N (> {args.epochs}) to extend it")
        return 0
    info, device = distributed.init_distributed(args.device)
    args.data_root = str(Path(args.data_root or "processed_data").resolve())
    if resumed is not None:
        check_resumed_data(args, resumed)
    output_dir = claim_output_dir(args, info)
    if info.is_main:
        closing.enter_context(run_log.ConsoleCopy()).start(output_dir / "train.log", append=bool(args.resume)
                                                           and not args.overwrite)
    amp = resolve_amp(args.amp, device)
    seed_everything(args.seed)
    progress = info.is_main and not args.no_progress
    data = build_data(args, info, run_tokenizer(args, resumed), resumed)

    model = (CFine(CFineConfig.from_dict(resumed["config"]), text_vocab=resumed.get("text_vocab")) if resumed
             else build_model(args, data.loader.dataset.num_classes))
    model.to(device)
    if args.sync_bn:
        convert_to_global_bn(model)
    model.head.gather_features = args.gather_features
    optimizer, scheduler = build_optimizer(
        model, lr_head=args.lr_head, lr_image=args.lr_image, lr_text=args.lr_text, wd_image=args.wd_image,
        warmup_epochs=args.warmup_epochs, warmup_start=args.warmup_start, milestones=tuple(args.milestones),
        gamma=args.gamma)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    run = restore_run(resumed, model, optimizer, scheduler, scaler, args, info) if resumed else RunState()
    guard = StepGuard(model, optimizer, args.max_nonfinite, run.skipped_steps, run.nonfinite_in_a_row)
    # The step runs the DDP wrapper, compiled as a whole (DDP's graph splitting at bucket boundaries keeps the
    # gradient all-reduce overlapped with backward); checkpoints and evaluation use the plain module.
    step_model = compiled(distributed.wrap_ddp(model, device), args.compile)
    board = None
    if info.is_main:
        start_output(output_dir, args, model, data, info, device, amp, run.epoch)
        if args.tensorboard:
            steps_done = run.epoch * data.loader.sampler.batches_per_epoch + run.step_in_epoch
            board = closing.enter_context(run_log.TrainingBoard(output_dir / "tb", model, args.log_every, steps_done))

    if info.is_main:
        print(run_log.epoch_table_header(data.eval_split))
    if args.eval_at_start and run.epoch == 0 and run.step_in_epoch == 0 and not run.history:
        results = evaluate(model, data, args, device, amp, progress)
        run.history.append({"epoch": 0, **metrics_row(results, data.eval_split)})
        if board:
            board.log_epoch(run.history[-1])
        if info.is_main:
            print(run_log.epoch_table_row(run.history[-1], args.epochs, best=False))

    with StopRequest() as stop:
        try:
            for epoch in range(run.epoch, args.epochs):
                data.loader.sampler.set_epoch(epoch, start_batch=run.step_in_epoch)
                started = time.perf_counter()
                stats = train_one_epoch(step_model, data.loader, optimizer, scaler, guard, stop, device=device, amp=amp,
                                        epoch=epoch, start_step=run.step_in_epoch, progress=progress,
                                        chunk_size=args.chunk_size)
                row = epoch_row(epoch, stats, optimizer, guard, started)
                scheduler.step()
                distributed.broadcast_buffers(model)  # every rank now holds what rank 0 saves below
                if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
                    row.update(metrics_row(evaluate(model, data, args, device, amp, progress), data.eval_split))
                improved = run.finish_epoch(row)
                if board:
                    board.log_epoch(row)
                if info.is_main:
                    save_files(output_dir, make_checkpoint(model, optimizer, scheduler, scaler, guard, run, args, data),
                               best=improved, history=run.history)
                    print(run_log.epoch_table_row(row, args.epochs, improved))  # once saved: a printed epoch is in last.pt
                run.saved = output_dir / "last.pt"
        except TrainingStopped as stopped:
            run.step_in_epoch = stopped.step
            if info.is_main:
                save_files(output_dir, make_checkpoint(model, optimizer, scheduler, scaler, guard, run, args, data))
                launcher = "torchrun ... train.py" if info.enabled else "python train.py"
                print(f"stopped by {stop.signal_name or 'a signal to another process'} at epoch {run.epoch + 1}, step "
                      f"{stopped.step}; state saved to {output_dir / 'last.pt'}. Resume with: {launcher} --resume "
                      f"{output_dir / 'last.pt'}", file=sys.stderr)
            distributed.cleanup()  # torchrun stops a group as soon as one rank exits non-zero: last.pt is written
            return 130 if stop.signal_name == "SIGINT" else 143
        except TrainingDiverged as diverged:
            kept = f"{run.saved} holds the last good state" if run.saved else "no checkpoint of this run was written yet"
            raise SystemExit(f"training diverged at epoch {run.epoch + 1}: {diverged}; {kept} (lower the learning "
                             "rates or use --amp off)") from None
    if info.is_main:
        print(f"done: best {data.eval_split} R@1 {run.best['R1']:.2f} at epoch {run.best['epoch']} "
              f"({output_dir / 'best.pt'})")
    distributed.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(distributed.run(main, ARGS))
