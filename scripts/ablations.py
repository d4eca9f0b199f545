"""Train and test every row of an ablation table under several seeds, then one table of mean ± std per row.

    python -m scripts.ablations --rows configs/ablations/clip --seeds 1 2 3 --out runs/ablations/clip
    python -m scripts.ablations --rows configs/ablations/clip --seeds 42 --out demo_run/ablations_clip \\
        --base configs/demo.json --split val -- --epochs 2

Each row is a train.py config file in --rows (its name: the file name without .json; the rows in name order).
--base FILE lays its settings over every row except the ablation keys (the switches mgf, cfr, fcd, every loss
weight and the margin), which stay the row's: the same ablation table on other data or another model size (the
CPU demo: --base configs/demo.json). The merged settings of a row are written to <out>/<row>/train_config.json,
and each seed runs as scripts/seeds.py runs one: train.py --config that file into <out>/<row>/seed_<s>/, test.py
on its best.pt; a seed already evaluated is reused and an interrupted one resumes from its last.pt. A row whose
train_config.json holds other settings while its seeds have started is refused (they trained with those): use
another --out.
The table (<out>/ablations.md) and the raw numbers (<out>/ablations.json) give, per row, its switches and loss
weights and mean ± sample standard deviation (n - 1) over the seeds of text-to-image R@1, R@5, R@10, mAP and
mINP, with n. Arguments after `--` go to train.py (not the ablation keys: those are the rows').
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # also run as `python scripts/ablations.py`
from engine import settings as train_settings  # noqa: E402
from scripts.seeds import HEADERS, METRICS, check_seeds, mean_std, run_seed, summarise, train_flags  # noqa: E402
from utils.errors import SettingError, run_main  # noqa: E402
from utils.files import atomic_write, write_json  # noqa: E402

SHOWN_WEIGHTS = ("diversity_weight", "ranking_weight")  # the weights the rows of the paper's table change


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Every row of an ablation table over several seeds: one table of "
                                                 "mean ± std of the test metrics")
    parser.add_argument("--rows", required=True, help="a folder of train.py config files, one per row "
                                                      "(configs/ablations/clip or configs/ablations/paper)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--out", required=True, help="folder for <row>/seed_<s>/ runs, ablations.md and ablations.json")
    parser.add_argument("--base", help="a train.py config laid over every row, except the ablation keys "
                                       "(switches, loss weights, margin), which stay the row's")
    parser.add_argument("--split", default="test", choices=["test", "val"], help="split the table reports")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: extra train.py flags")
    return parser


def row_files(folder: str) -> list[Path]:
    """The rows: the folder's *.json files, in name order."""
    rows = sorted(Path(folder).glob("*.json")) if Path(folder).is_dir() else []
    if not rows:
        raise SettingError(f"--rows {folder}: no such folder, or no .json config files in it")
    return rows


def merged_settings(row: dict, base: dict) -> dict:
    """The row's settings with base laid over them, except the ablation keys, which stay the row's; no output_dir
    (each seed's run folder is given to train.py)."""
    merged = {**row, **{key: value for key, value in base.items() if key not in train_settings.ABLATION_KEYS}}
    merged.pop("output_dir", None)
    return merged


def write_row_config(folder: Path, settings: dict) -> Path:
    """folder/train_config.json holding settings (atomically); one already there with other settings is replaced
    only while no seed has started from it."""
    path = folder / "train_config.json"
    if path.is_file() and json.loads(path.read_text(encoding="utf-8")) != settings and any(folder.glob("seed_*")):
        raise SettingError(f"{path} holds other settings than this row now gives, and its runs were trained with "
                           "those: choose another --out, or delete that row's folder to train it again")
    folder.mkdir(parents=True, exist_ok=True)
    write_json(path, settings)
    return path


def check_row(name: str, config: Path, extra: list[str]) -> None:
    """train.py's own checks of a row's new run (each setting, the flags after --, the rules between them), so that a
    row that cannot start stops everything before any row trains."""
    parser = train_settings.get_args_parser("")

    def refuse(message: str):
        raise SettingError(f"row {name} ({config}): {message}")

    parser.error = refuse  # one SettingError naming the row, instead of train.py's exit
    train_settings.parse(parser, ["--config", str(config), "--output_dir", str(config.parent / "check"), *extra])


def row_description(settings: dict) -> dict:
    """The row's switches and loss weights (the table's defaults for those it does not give)."""
    return {key: settings.get(key, train_settings.TABLE[key].default) for key in train_settings.ABLATION_KEYS}


def check_train_flags(extra: list[str]) -> None:
    """Flags after `--` may not name an ablation key: each row's are its own."""
    for flag in extra:
        name = flag.removeprefix("--").split("=")[0].replace("-", "_")
        if flag.startswith("--") and name in train_settings.ABLATION_KEYS:
            raise SettingError(f"{flag} after --: {name} is an ablation key, each row's own (edit the row files, or "
                               "give another --rows folder)")


def _cell(summary: dict, n: int) -> list[str]:
    return [mean_std(summary[k]) for k in METRICS] + [str(n)]


def markdown_table(rows: list[dict], title: str) -> str:
    """One line per row: its name, switches and the weights the rows change, then mean ± std of each metric and n."""
    switches = train_settings.ABLATION_SWITCHES
    columns = ["row", *switches, *(w.removesuffix("_weight") for w in SHOWN_WEIGHTS), *(HEADERS[k] for k in METRICS),
               "n"]
    lines = [title, "", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for row in rows:
        described = row["settings"]
        cells = [row["name"], *(described[s] for s in switches), *(f"{described[w]:g}" for w in SHOWN_WEIGHTS),
                 *_cell(row["summary"], len(row["per_seed"]))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> int:
    check_seeds(args.seeds)
    extra = train_flags(args.train_args)
    check_train_flags(extra)
    base = train_settings.read_config(args.base) if args.base else {}
    out = Path(args.out)
    prepared = []  # every row's settings written and checked before the first trains
    for path in row_files(args.rows):
        settings = merged_settings(train_settings.read_config(str(path)), base)
        config = write_row_config(out / path.stem, settings)
        check_row(path.stem, config, extra)
        prepared.append((path, settings, config))
    rows = []
    for path, settings, config in prepared:
        per_seed = {seed: run_seed(config, config.parent, seed, args.split, extra) for seed in args.seeds}
        rows.append({"name": path.stem, "row": str(path), "settings": row_description(settings),
                     "per_seed": per_seed, "summary": summarise(per_seed)})
    seeds = " ".join(map(str, args.seeds))
    title = (f"{args.rows}{f' over --base {args.base}' if args.base else ''}, {args.split} split, text-to-image, "
             f"seeds {seeds} (mean ± sample std over the seeds; n seeds)")
    table = markdown_table(rows, title)
    atomic_write(out / "ablations.md", lambda f: f.write(table.encode("utf-8")))
    write_json(out / "ablations.json", {"rows_folder": args.rows, "base": args.base, "split": args.split,
                                        "seeds": args.seeds, "train_args": extra, "rows": rows})
    print(table)
    print(f"wrote {out / 'ablations.md'} and {out / 'ablations.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, get_args_parser().parse_args()))
