"""`python -m datasets.prepare ROOT [NAME|all]`: check a benchmark on disk, then write processed_data/<NAME>.

Every check runs before anything is written; the output folder is replaced in one atomic rename-exchange
(utils/files.py swap_into_place), so a failed or killed run leaves the previous `processed_data/<NAME>` exactly
as it was, and the next run removes what it left beside it. Exit status 0 on success, 1 on a data
problem (one paragraph on stderr saying what, where and what to do), 2 on a usage error.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from datasets import BENCHMARKS, PARSERS
from datasets.base import DataError, Parsed, Record
from datasets.images import ImageReport, check_images, usable_cpus
from datasets.validate import RecordReport, clean_records, describe_indices
from utils.errors import run_main
from utils.files import remove_stale, restore_moved_aside, sha256_file, write_atomically

# 2: a record whose captions cleaning changed keeps the annotation's strings beside them (`raw_captions`, for bert
# mode); 1 (earlier data.sh runs) kept the cleaned captions alone. datasets/processed.py reads both.
FORMAT_VERSION = 2
SPLIT_ORDER = ("train", "val", "test")


def split_file(split: str) -> str:
    """Name of a processed split file: `<split>_reid.json`."""
    return f"{split}_reid.json"


@dataclass
class Prepared:
    """One benchmark checked and ready to write (or found up to date)."""

    name: str
    out_dir: Path
    files: dict[str, bytes] = field(default_factory=dict)  # file name -> content, meta.json last
    notes: list[str] = field(default_factory=list)
    up_to_date: bool = False


def input_fingerprint(parsed: Parsed, annotation_sha: str, options: dict) -> str:
    """Hash of the annotation, every image's (path, size, mtime) and the options: equal means unchanged input."""
    header = [FORMAT_VERSION, annotation_sha, str(parsed.image_root.resolve()), options]
    digest = hashlib.sha256(json.dumps(header).encode())
    for rel in sorted({r.image for r in parsed.records}):
        try:
            st = os.stat(parsed.image_root / rel)
            digest.update(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{rel}\tmissing\n".encode())
    return digest.hexdigest()


def is_up_to_date(out_dir: Path, fingerprint: str) -> bool:
    """True if `out_dir` was written from this exact input and its files are intact."""
    try:
        meta = json.loads((out_dir / "meta.json").read_text())
        return meta.get("input_fingerprint") == fingerprint and all(
            sha256_file(out_dir / name) == sha for name, sha in meta["outputs"].items()
        )
    except (OSError, ValueError, KeyError, AttributeError, TypeError, RecursionError):
        return False


def locate(root: Path, name: str) -> Path | None:
    """`root/<name>`, or `root` itself when it already is that benchmark's folder; None if absent."""
    bench = BENCHMARKS[name]
    for candidate in (root / name, root):
        if any((candidate / a).is_file() for a in bench.annotation_names):
            return candidate
    return None


def _encode_records(records: list[dict]) -> bytes:
    """A JSON list with one record per line: diff-friendly and still one json.load."""
    return ("[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n]\n").encode("utf-8")


def processed_record(record: Record) -> dict:
    """A split file's record: pid, image, cleaned captions and, only where cleaning changed one, the annotation's
    string of every caption (`raw_captions`, in the same order)."""
    row = {"pid": record.pid, "image": record.image, "captions": list(record.captions)}
    if record.raw_captions and record.raw_captions != record.captions:
        row["raw_captions"] = list(record.raw_captions)
    return row


def _notes(parsed: Parsed, report: RecordReport, images: ImageReport) -> list[str]:
    """What preparation repaired, dropped or converted, one sentence each."""
    notes = []
    if parsed.string_ids:
        notes.append(f"{parsed.string_ids} id(s) were strings of digits and were read as integers.")
    if report.changed_captions:
        notes.append(f"{report.changed_captions} caption(s) had HTML entities or stray whitespace cleaned (their "
                     "annotation strings are kept beside them for bert mode).")
    if report.empty_captions:
        notes.append(f"dropped {len(report.empty_captions)} empty or whitespace-only caption(s) "
                     f"(in records {describe_indices(sorted(set(report.empty_captions)))}).")
    if report.captionless:
        notes.append(f"dropped {len(report.captionless)} record(s) left with no caption "
                     f"(records {describe_indices(report.captionless)}).")
    if report.exact_duplicates:
        pairs = ", ".join(f"{d} (= {f})" for d, f in report.exact_duplicates[:10])
        notes.append(f"dropped {len(report.exact_duplicates)} exact duplicate record(s): {pairs}.")
    if images.bad:
        listed = _first_bad_images(images)
        notes.append(f"--skip_bad_images dropped {len(images.bad)} record(s) with bad images ({listed}).")
    odd_modes = {m: n for m, n in images.modes.items() if m != "RGB"}
    if odd_modes:
        notes.append(f"non-RGB images (converted to RGB when loaded): {dict(sorted(odd_modes.items()))}.")
    if images.small:
        notes.append(f"{images.small} image(s) are smaller than 16 px on a side (kept, resized when loaded).")
    return notes


def _first_bad_images(images: ImageReport) -> str:
    """The first 10 missing or undecodable images, with why, for a message."""
    return "; ".join(f"imgs/{rel}: {why}" for rel, why in images.bad[:10])


def prepare(dataset_dir: Path, name: str, out: Path, *, workers: int | None, skip_bad_images: bool,
            force: bool) -> Prepared:
    """Parse, clean and check one benchmark; raise DataError listing every problem found."""
    parsed = PARSERS[name](dataset_dir)
    result = Prepared(name, out / name)
    annotation_sha = sha256_file(parsed.annotation)
    options = {"skip_bad_images": skip_bad_images}
    fingerprint = input_fingerprint(parsed, annotation_sha, options)
    if not force and is_up_to_date(result.out_dir, fingerprint):
        result.up_to_date = True
        result.notes.append(f"{name}: up to date (annotation sha256 {annotation_sha[:12]}…, images unchanged); "
                            "nothing written (pass --force to rebuild).")
        return result

    records, report = clean_records(parsed.records)
    problems = [f"{parsed.annotation}: {e}." for e in report.errors[:10]]
    if len(report.errors) > 10:
        problems.append(f"({len(report.errors) - 10} more conflicting duplicates.)")
    images = check_images(parsed.image_root, [r.image for r in records], workers, desc=f"{name}: checking images")
    if images.bad and not skip_bad_images:
        listed = _first_bad_images(images)
        problems.append(
            f"{len(images.bad)} of {len(records)} images under {parsed.image_root} are missing or do not decode "
            f"(first {min(10, len(images.bad))}: {listed}). Restore them from the dataset's distribution, "
            "or pass --skip_bad_images to drop those records."
        )
    bad = {rel for rel, _ in images.bad} if skip_bad_images else set()
    records = [r for r in records if r.image not in bad]
    for split in ("train", "test"):
        if not any(r.split == split for r in records):
            problems.append(f"{parsed.annotation}: no usable '{split}' records; a benchmark needs train and test.")
    if problems:
        raise DataError(f"{name}: " + " ".join(problems))
    result.notes += _notes(parsed, report, images)

    counts, outputs = {}, {}
    for split in SPLIT_ORDER:
        rows = [processed_record(r) for r in records if r.split == split]
        if not rows:
            continue
        content = _encode_records(rows)
        result.files[split_file(split)] = content
        outputs[split_file(split)] = hashlib.sha256(content).hexdigest()
        counts[split] = {"ids": len({r["pid"] for r in rows}), "images": len(rows),
                         "captions": sum(len(r["captions"]) for r in rows)}
    meta = {
        "dataset": name,
        "format_version": FORMAT_VERSION,
        "annotation": {"path": str(parsed.annotation.resolve()), "sha256": annotation_sha},
        "image_root": str(parsed.image_root.resolve()),
        "splits": counts,
        "dropped": {"empty_captions": len(report.empty_captions), "captionless_records": len(report.captionless),
                    "duplicate_records": len(report.exact_duplicates), "bad_images": sorted(bad)},
        "input_fingerprint": fingerprint,
        "outputs": outputs,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    result.files["meta.json"] = (json.dumps(meta, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    return result


def _summary(prep: Prepared) -> str:
    """Per-split counts of a freshly prepared benchmark, one line."""
    meta = json.loads(prep.files["meta.json"])
    parts = [f"{s} {c['ids']} ids / {c['images']} images / {c['captions']} captions" for s, c in meta["splits"].items()]
    return f"{prep.name}: wrote {prep.out_dir} ({'; '.join(parts)})."


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line interface of the data step."""
    p = argparse.ArgumentParser(
        prog="bash data.sh",
        description="Check a text-to-image person re-id benchmark and write processed_data/<NAME>/"
                    "{train,val,test}_reid.json and meta.json.",
    )
    p.add_argument("root", type=Path, help="folder holding CUHK-PEDES/, ICFG-PEDES/ and/or RSTPReid/")
    p.add_argument("name", nargs="?", default="all", choices=[*BENCHMARKS, "all"],
                   help="which benchmark (default: all found under root)")
    p.add_argument("--out", type=Path, default=Path("processed_data"), help="output folder (default: processed_data)")
    p.add_argument("--workers", type=int, default=None, help="processes for image checks (default: all cores)")
    p.add_argument("--skip_bad_images", "--skip-bad-images", action="store_true",
                   help="drop records whose image is missing or does not decode instead of stopping")
    p.add_argument("--force", action="store_true", help="rebuild even when the input is unchanged")
    return p


def main(argv: list[str] | None = None) -> int:
    """data.sh's exit status: 0 when every requested benchmark is prepared, 1 with one message otherwise."""
    return run_main(prepare_all, get_args_parser().parse_args(argv))


def prepare_all(args: argparse.Namespace) -> int:
    """Check every requested benchmark first; write only if all of them pass."""
    if not args.root.is_dir():
        raise DataError(f"data.sh: error: dataset root {args.root} is not a folder. Pass the folder that holds "
                        "CUHK-PEDES/, ICFG-PEDES/ or RSTPReid/ (see the README, section Data).")
    names = list(BENCHMARKS) if args.name == "all" else [args.name]
    workers = args.workers or usable_cpus()
    for name in names:  # first of all, whatever this run's input: an earlier output that a killed run moved aside
        for restored in restore_moved_aside(args.out, of=name):
            print(f"{name}: restored {args.out / restored}, which an interrupted earlier run had moved aside.")
    prepared, errors, missing = [], [], []
    for name in names:
        dataset_dir = locate(args.root, name)
        if dataset_dir is None:
            missing.append(name)
            continue
        try:
            prepared.append(prepare(dataset_dir, name, args.out, workers=workers,
                                    skip_bad_images=args.skip_bad_images, force=args.force))
        except DataError as err:
            errors.append(str(err))
    if args.name != "all" and missing:
        bench = BENCHMARKS[args.name]
        errors.append(f"{args.name}: no {' or '.join(bench.annotation_names)} in {args.root / args.name} "
                      f"(nor in {args.root}). Pass the folder that contains {args.name}/.")
    elif not prepared and not errors:
        errors.append(f"no benchmark found under {args.root}: expected {', '.join(f'{n}/' for n in names)} "
                      "with its annotation file (see the README, section Data).")
    if errors:  # every benchmark's problems at once
        raise DataError("data.sh: error: " + " ".join(errors) + f" Nothing was written; {args.out} is unchanged.")
    for prep in prepared:
        for stale in remove_stale(prep.out_dir.parent, of=prep.out_dir.name):
            print(f"{prep.name}: removed {args.out / stale}, left by an interrupted earlier run.")
        for note in prep.notes:
            print(note if note.startswith(prep.name) else f"{prep.name}: {note}")
        if not prep.up_to_date:
            try:
                write_atomically(prep.out_dir, prep.files)
            except OSError as err:
                raise DataError(f"data.sh: error: writing {prep.out_dir} failed ({err}); its previous contents are "
                                f"kept. Free disk space or fix the permissions of {args.out}, then re-run.") from None
            print(_summary(prep))
    if missing:
        print(f"not found under {args.root} (skipped): {', '.join(missing)}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
