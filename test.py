"""Evaluate a CFine checkpoint, or CLIP zero-shot: text-to-image and image-to-text R@1/5/10, mAP and mINP
(docs/method.md §7).

    python test.py --checkpoint runs/cuhk/best.pt [--split test] [--visualize 8] [--plot] [--save_features f.npz]
    python test.py --zero_shot --clip ViT-B/16 --dataset CUHK-PEDES      # CLIP's own features, no CFine head
    torchrun --standalone --nproc_per_node 4 test.py --checkpoint runs/cuhk/best.pt
The model is rebuilt from the checkpoint alone (no CLIP file needed). Under torchrun each process encodes a
share of the split and the metrics equal the one-process ones exactly; only rank 0 writes files.
"""
from __future__ import annotations

# ruff: noqa: E402 (the flags are parsed before the heavy imports: see below)
import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from engine.settings import AMP_MODES, TABLE, Setting, default_device, flag_type


def benchmark_name(text: str) -> str:
    """argparse type of --dataset: a benchmark's name exactly (a folder such as CUHK-PEDES/ is --data_root's part:
    taken as a name it would skip the check that a run's own benchmark is the run's data)."""
    names = TABLE["dataset"].choices
    if text not in names:
        raise argparse.ArgumentTypeError(f"{json.dumps(text)} is not a benchmark name; dataset takes one of "
                                         f"{', '.join(names)} (the folder that holds it is --data_root)")
    return text


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Evaluate a CFine checkpoint, or CLIP zero-shot")
    parser.add_argument("--checkpoint", help="best.pt or last.pt written by train.py (required unless --zero_shot)")
    parser.add_argument("--zero_shot", "--zero-shot", action="store_true",
                        help="evaluate CLIP's own pooled image and text embeddings, no CFine head and no checkpoint: "
                             "needs --clip and --dataset")
    parser.add_argument("--clip", metavar="NAME_OR_PATH",
                        help="--zero_shot's CLIP weights: a released name (ViT-B/16, looked up in ~/.cache/clip) or a "
                             "checkpoint file; evaluated at their native resolution with CLIP's mean/std")
    parser.add_argument("--dataset", type=benchmark_name, metavar="{" + ",".join(TABLE["dataset"].choices) + "}",
                        help="default: the dataset the checkpoint was trained on (required with --zero_shot)")
    parser.add_argument("--data_root", "--data-root",
                        help="folder holding data.sh's <dataset>/ (default: the training run's; processed_data "
                             "with --zero_shot)")
    parser.add_argument("--split", default="test", choices=["test", "val"],
                        help="val: the dataset's val split, or the training ids a run held out as val (ICFG-PEDES)")
    parser.add_argument("--output_dir", "--output-dir",
                        help="default: <checkpoint folder>/eval_<split>; runs/zero_shot/<dataset>_<split> with "
                             "--zero_shot")
    parser.add_argument("--save_features", "--save-features", metavar="FILE.npz",
                        help="also write what was ranked to FILE.npz: the L2-normalised gallery and query features, "
                             "their pids, the gallery's image paths and the captions (docs/training.md)")
    parser.add_argument("--device", type=flag_type(TABLE["device"]),
                        help="cpu, cuda or cuda:N (default: cuda when a GPU is visible, else cpu)")
    parser.add_argument("--amp", choices=AMP_MODES,
                        help="default: off for a run trained with --amp off (the *_paper.json configs: fp32, as the "
                             "authors evaluated), else auto (bf16 on GPUs that support it)")
    parser.add_argument("--compile", default="off", type=flag_type(TABLE["compile"]), metavar="BACKEND",
                        help="torch.compile the encoders: off, inductor or aot_eager")
    parser.add_argument("--batch_size", "--batch-size", type=flag_type(Setting("batch_size", 128, int, minimum=1)),
                        default=128)
    parser.add_argument("--workers", type=flag_type(TABLE["workers"]), default=None,
                        help="data loader processes per process")
    parser.add_argument("--visualize", type=flag_type(Setting("visualize", 0, int, minimum=0)), default=0, metavar="N",
                        help="write N PNG pages: a query caption and its top-10 gallery images (green = same id)")
    parser.add_argument("--plot", action="store_true", help="also plot training curves from the run's metrics.jsonl")
    parser.add_argument("--no_progress", "--no-progress", action="store_true")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, with the checks that span several of them (argparse's one-line error and exit status 2)."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.zero_shot:
        if args.checkpoint is not None:
            parser.error("--zero_shot evaluates CLIP's own features and takes no --checkpoint (drop one of the two)")
        missing = [need for need, value in (("--clip NAME_OR_PATH (the CLIP weights)", args.clip),
                                            ("--dataset NAME (the benchmark to rank)", args.dataset)) if value is None]
        if missing:
            parser.error(f"--zero_shot needs {' and '.join(missing)}")
        if args.plot:
            parser.error("--plot draws a training run's curves; --zero_shot has no run")
    elif args.checkpoint is None:
        parser.error("the following arguments are required: --checkpoint (or --zero_shot with --clip and --dataset)")
    elif args.clip is not None:
        parser.error("--clip is --zero_shot's: a checkpoint carries its own CLIP weights")
    return args


# Run as a script, test.py reads its flags before the imports below, which load torch (over 10 s): --help and a
# mistyped flag answer at once. Imported as a module (tests), it defines everything as usual.
if __name__ == "__main__":
    ARGS = parse_args()


from torch import nn

from datasets.build import available_splits, build_eval_data, loader_workers
from datasets.processed import check_same_data
from engine.data import held_out_ids
from engine.environment import machine
from evaluation.curves import plot_training_curves
from evaluation.encode import encode_split, format_table, score_split
from evaluation.feature_file import save_features
from evaluation.visualize import query_pages
from evaluation.zero_shot import FEATURE_NAME, load_zero_shot
from models.checkpoint import load_model
from models.precision import resolve_amp, use_tf32
from utils import distributed
from utils.errors import CheckpointError, DataError, SettingError
from utils.files import check_writable_folder, write_json


@dataclass
class Subject:
    """What test.py evaluates, on which data, and how metrics.json and the console name it."""

    model: nn.Module  # encode_split's interface: encode_images, encode_texts, feature_shape, tokenizer
    name: str  # the console's name for it
    processed: Path  # processed_data/<dataset>
    held_out: list[int]  # training ids carved off as the val split ([]: the split itself)
    image_size: tuple[int, int]
    mean_std: str
    out_dir: Path
    record: dict  # metrics.json's keys that say what was evaluated on what
    single_feature: str | None = None  # the name of its one retrieval feature, if it has one alone (format_table)
    amp: str = "auto"  # --amp when not given: off for a run trained without autocast


def carved_ids(state: dict, split: str, dataset: str) -> list[int]:
    """The training ids the run held out as its val split (datasets/holdout.py), for --split val on a dataset
    without one; [] otherwise."""
    train_args = state.get("args") if isinstance(state.get("args"), dict) else {}
    if split != "val" or dataset != train_args.get("dataset"):
        return []
    return held_out_ids(state)


def checkpoint_subject(args: argparse.Namespace, device) -> Subject:
    """The CFine of --checkpoint (its run's TF32 setting applied) on its run's data, or on --dataset's."""
    model, state = load_model(args.checkpoint, device)
    train_args = state.get("args") if isinstance(state.get("args"), dict) else {}
    use_tf32(train_args.get("tf32", "off"))  # the run's matrix-product precision (no effect on CPU)
    dataset = args.dataset or train_args.get("dataset")
    if dataset is None:
        raise CheckpointError(f"{args.checkpoint}: the checkpoint does not record the dataset its run trained on "
                              f"(args.dataset): pass --dataset NAME ({', '.join(TABLE['dataset'].choices)})")
    processed = Path(args.data_root or train_args.get("data_root", "processed_data")) / dataset
    if dataset == train_args.get("dataset"):  # the run's own benchmark: it must be the run's data
        check_same_data(state.get("data"), processed, args.checkpoint)
    splits = available_splits(processed)
    held_out = carved_ids(state, args.split, dataset) if args.split not in splits else []
    if args.split not in splits and not held_out:
        raise DataError(f"{processed} has no {args.split} split (it has: {', '.join(splits)})")
    out_dir = Path(args.output_dir) if args.output_dir else Path(args.checkpoint).parent / f"eval_{args.split}"
    record = {"checkpoint": str(args.checkpoint), "dataset": dataset, "split": "val_carved" if held_out else args.split,
              "selected_on": state.get("eval_split"), "epoch": state.get("epoch")}
    carved = f" (carved from train: {len(held_out)} held-out ids)" if held_out else ""
    return Subject(model, f"{args.checkpoint} on {dataset} {args.split}{carved}", processed, held_out,
                   tuple(model.config.clip.vision.image_size), train_args.get("mean_std", "clip"), out_dir, record,
                   single_feature="global" if model.feature_shape[0] == 1 else None,  # --mgf off: [BN(global)]
                   amp="off" if train_args.get("amp") == "off" else "auto")


def zero_shot_subject(args: argparse.Namespace, device) -> Subject:
    """CLIP's own pooled features (evaluation/zero_shot.py) on --dataset's --split: the CLIP weights' native
    resolution, CLIP's mean/std and tokeniser."""
    processed = Path(args.data_root or "processed_data") / args.dataset
    splits = available_splits(processed)
    if args.split not in splits:
        raise DataError(f"{processed} has no {args.split} split (it has: {', '.join(splits)}); --zero_shot has no "
                        "training run whose held-out ids could make one: evaluate on --split test")
    model = load_zero_shot(args.clip, device)
    out_dir = Path(args.output_dir) if args.output_dir else Path("runs") / "zero_shot" / f"{args.dataset}_{args.split}"
    record = {"zero_shot": True, "clip": str(args.clip), "dataset": args.dataset, "split": args.split}
    return Subject(model, f"CLIP {args.clip} zero-shot on {args.dataset} {args.split}", processed, [],
                   model.image_size, "clip", out_dir, record, single_feature=FEATURE_NAME)


def check_writable(out_dir: Path, features: str | None) -> None:
    """The output folder and --save_features' folder accept a new file (before the evaluation, not after it)."""
    try:
        check_writable_folder(out_dir)
    except OSError as error:
        raise SettingError(f"--output_dir {out_dir}: cannot write there ({error})") from None
    if features is None:
        return
    if Path(features).is_dir():
        raise SettingError(f"--save_features {features}: is a folder; name the .npz file to write")
    try:
        check_writable_folder(Path(features).parent)
    except OSError as error:
        raise SettingError(f"--save_features {features}: cannot write there ({error})") from None


def main(args: argparse.Namespace) -> int:
    info, device = distributed.init_distributed(args.device or default_device())
    subject = zero_shot_subject(args, device) if args.zero_shot else checkpoint_subject(args, device)
    amp = resolve_amp(args.amp or subject.amp, device)
    workers = loader_workers(args.workers, info.local_world_size)
    if info.is_main:
        check_writable(subject.out_dir, args.save_features)
    data = build_eval_data(subject.processed, args.split, image_size=subject.image_size, batch_size=args.batch_size,
                           workers=workers, mean_std=subject.mean_std, tokenizer=subject.model.tokenizer,
                           held_out_ids=subject.held_out)
    encoded = encode_split(subject.model, data, device, amp, args.batch_size,
                           progress=info.is_main and not args.no_progress, compile=args.compile)
    results = score_split(encoded)
    if info.is_main:
        out_dir = subject.out_dir
        print(f"{subject.name}: {len(data.gallery_pids)} images, {len(data.query_pids)} captions")
        print(format_table(results, subject.single_feature))
        write_json(out_dir / "metrics.json", {**subject.record, **results, "machine": machine(device)})
        print(f"wrote {out_dir / 'metrics.json'}")
        if args.save_features:
            save_features(args.save_features, encoded, data.gallery_paths, data.query_captions)
            print(f"wrote {args.save_features}")
        if args.visualize > 0:
            pages = query_pages(encoded, data, out_dir / "visualize", args.visualize)
            print(f"wrote {len(pages)} pages to {out_dir / 'visualize'}")
        if args.plot:
            metrics = Path(args.checkpoint).parent / "metrics.jsonl"
            if not metrics.is_file():
                raise SettingError(f"--plot: {metrics} not found (it is written by train.py beside its checkpoints)")
            plot_training_curves(metrics, out_dir / "training_curves.png")
            print(f"wrote {out_dir / 'training_curves.png'}")
    distributed.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(distributed.run(main, ARGS))
