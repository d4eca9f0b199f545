"""Evaluate a CFine checkpoint: text-to-image and image-to-text R@1/5/10, mAP and mINP (docs/method.md §7).

    python test.py --checkpoint runs/cuhk/best.pt [--split test] [--visualize 8] [--plot]
    torchrun --standalone --nproc_per_node 4 test.py --checkpoint runs/cuhk/best.pt
The model is rebuilt from the checkpoint alone (no CLIP file needed). Under torchrun each process encodes a
share of the split and the metrics equal the one-process ones exactly; only rank 0 writes files.
"""
from __future__ import annotations

# ruff: noqa: E402 (the flags are parsed before the heavy imports: see below)
import argparse
import json
import sys
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
    parser = argparse.ArgumentParser(description="Evaluate a CFine checkpoint")
    parser.add_argument("--checkpoint", required=True, help="best.pt or last.pt written by train.py")
    parser.add_argument("--dataset", type=benchmark_name, metavar="{" + ",".join(TABLE["dataset"].choices) + "}",
                        help="default: the dataset the checkpoint was trained on")
    parser.add_argument("--data_root", "--data-root",
                        help="folder holding data.sh's <dataset>/ (default: the training run's)")
    parser.add_argument("--split", default="test", choices=["test", "val"],
                        help="val: the dataset's val split, or the training ids a run held out as val (ICFG-PEDES)")
    parser.add_argument("--output_dir", "--output-dir", help="default: <checkpoint folder>/eval_<split>")
    parser.add_argument("--device", type=flag_type(TABLE["device"]),
                        help="cpu, cuda or cuda:N (default: cuda when a GPU is visible, else cpu)")
    parser.add_argument("--amp", default="auto", choices=AMP_MODES)
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


# Run as a script, test.py reads its flags before the imports below, which load torch (over 10 s): --help and a
# mistyped flag answer at once. Imported as a module (tests), it defines everything as usual.
if __name__ == "__main__":
    ARGS = get_args_parser().parse_args()


from datasets.build import available_splits, build_eval_data, loader_workers
from datasets.processed import check_same_data
from engine.data import held_out_ids
from engine.environment import machine
from evaluation.curves import plot_training_curves
from evaluation.encode import encode_split, format_table, score_split
from evaluation.visualize import query_pages
from models.checkpoint import load_model
from models.precision import resolve_amp
from utils import distributed
from utils.errors import CheckpointError, DataError, SettingError
from utils.files import check_writable_folder, write_json


def carved_ids(state: dict, split: str, dataset: str) -> list[int]:
    """The training ids the run held out as its val split (datasets/holdout.py), for --split val on a dataset
    without one; [] otherwise."""
    train_args = state.get("args") if isinstance(state.get("args"), dict) else {}
    if split != "val" or dataset != train_args.get("dataset"):
        return []
    return held_out_ids(state)


def main(args: argparse.Namespace) -> int:
    info, device = distributed.init_distributed(args.device or default_device())
    model, state = load_model(args.checkpoint, device)
    train_args = state.get("args") if isinstance(state.get("args"), dict) else {}
    dataset = args.dataset or train_args.get("dataset")
    if dataset is None:
        raise CheckpointError(f"{args.checkpoint}: the checkpoint does not record the dataset its run trained on "
                              f"(args.dataset): pass --dataset NAME ({', '.join(TABLE['dataset'].choices)})")
    data_root = args.data_root or train_args.get("data_root", "processed_data")
    processed = Path(data_root) / dataset
    amp = resolve_amp(args.amp, device)
    image_size = tuple(model.config.clip.vision.image_size)
    workers = loader_workers(args.workers, info.local_world_size)
    out_dir = Path(args.output_dir) if args.output_dir else Path(args.checkpoint).parent / f"eval_{args.split}"
    if info.is_main:  # before the evaluation, not after it
        try:
            check_writable_folder(out_dir)
        except OSError as error:
            raise SettingError(f"--output_dir {out_dir}: cannot write there ({error})") from None
    if dataset == train_args.get("dataset"):  # the run's own benchmark: it must be the run's data
        check_same_data(state.get("data"), processed, args.checkpoint)
    splits = available_splits(processed)
    held_out = carved_ids(state, args.split, dataset) if args.split not in splits else []
    if args.split not in splits and not held_out:
        raise DataError(f"{processed} has no {args.split} split (it has: {', '.join(splits)})")
    data = build_eval_data(processed, args.split, image_size=image_size, batch_size=args.batch_size,
                           workers=workers, mean_std=train_args.get("mean_std", "clip"),
                           tokenizer=model.tokenizer, held_out_ids=held_out)
    encoded = encode_split(model, data, device, amp, args.batch_size, progress=info.is_main and not args.no_progress,
                           compile=args.compile)
    results = score_split(encoded)
    if info.is_main:
        carved = f" (carved from train: {len(held_out)} held-out ids)" if held_out else ""
        print(f"{args.checkpoint} on {dataset} {args.split}{carved}: {len(data.gallery_pids)} images, "
              f"{len(data.query_pids)} captions")
        print(format_table(results))
        write_json(out_dir / "metrics.json", {"checkpoint": str(args.checkpoint), "dataset": dataset,
                                              "split": "val_carved" if held_out else args.split,
                                              "selected_on": state.get("eval_split"), "epoch": state.get("epoch"),
                                              **results, "machine": machine(device)})
        print(f"wrote {out_dir / 'metrics.json'}")
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
