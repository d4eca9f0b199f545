"""`python -m datasets.synthetic --out DIR --format NAME --ids N --images_per_id M --seed S`.

Writes DIR/<NAME>/ in exactly that benchmark's raw layout (annotation file, imgs/ tree, split names,
id conventions, captions per image), so `bash data.sh DIR NAME` reads it like the real thing. Output is a
pure function of the arguments: every image and caption draws from its own RNG seeded by (seed, id, k).
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

from datasets import BENCHMARKS
from datasets.base import Benchmark
from datasets.synthetic.attributes import make_caption, sample_identities
from datasets.synthetic.drawing import render
from utils.errors import SettingError, run_main
from utils.files import remove_stale, replacing_folder

IMAGE_SIZE = (64, 128)  # width, height: a typical pedestrian crop's aspect ratio
CUHK_SOURCES = ("CUHK01", "CUHK03", "Market", "cam_a", "cam_b", "train_query", "test_query")


def split_of_ids(n: int, bench: Benchmark) -> list[str]:
    """Split of each identity 0..n-1 in blocks: ~80/10/10 train/val/test, or ~80/20 without val."""
    held = [s for s in bench.splits if s != "train"]
    sizes = {s: max(1, round(n * (0.2 if len(held) == 1 else 0.1))) for s in held}
    if n < sum(sizes.values()) + 1:
        raise ValueError(f"{bench.name} needs at least {sum(sizes.values()) + 1} ids (one per split)")
    order = ["train"] * (n - sum(sizes.values()))
    for s in held:
        order += [s] * sizes[s]
    return order


def raw_id(bench: Benchmark, pid: int) -> int:
    """The id as the benchmark writes it: CUHK-PEDES counts from 1, the others from 0."""
    return pid + 1 if bench.name == "CUHK-PEDES" else pid


def image_path(bench: Benchmark, pid: int, k: int, split: str) -> str:
    """Image path relative to imgs/, in the benchmark's naming style (mixed folders and extensions for CUHK)."""
    rid = raw_id(bench, pid)
    cam = 1 + k % 6
    if bench.name == "CUHK-PEDES":
        source = CUHK_SOURCES[pid % len(CUHK_SOURCES)]
        name = {"CUHK01": f"{rid:04d}{k + 1:03d}.png", "CUHK03": f"{rid}_{k + 1}.png",
                "Market": f"{rid:04d}_c{cam}s1_{k:06d}_00.jpg", "cam_a": f"{rid:03d}_{k * 45}.bmp",
                "cam_b": f"{rid:03d}_{k * 45}.bmp"}.get(source, f"p{rid}_s{k}.jpg")
        return f"{source}/{name}"
    if bench.name == "ICFG-PEDES":
        return f"{split}/{rid:04d}/{rid:04d}_{cam:03d}_{k + 1:02d}.jpg"
    return f"{rid:04d}_c{cam}_{k:04d}.jpg"


def captions_for_image(bench: Benchmark, rng: random.Random) -> int:
    """How many captions an image gets: the benchmark's count (a few CUHK-PEDES images have one more)."""
    if bench.name == "CUHK-PEDES" and rng.random() < 0.03:
        return 3
    return bench.captions_per_image


def word_tokens(caption: str) -> list[str]:
    """The legacy `processed_tokens` of CUHK/ICFG records: lower-case words."""
    return re.findall(r"[a-z]+(?:-[a-z]+)?", caption.lower())


def save_image(img, path: Path) -> None:
    """Save in the format the extension names (JPEG at the quality public crops typically have)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jpg":
        img.save(path, quality=90)
    else:
        img.save(path)


def identities(ids: int, seed: int) -> list[dict]:
    """The attribute combinations of identities 0..ids-1 for `seed` (what every image and caption depicts)."""
    return sample_identities(ids, random.Random(f"identities-{seed}"))


def generate(out: Path, name: str, ids: int, images_per_id: int, seed: int,
             size: tuple[int, int] = IMAGE_SIZE) -> Path:
    """Write a synthetic `name` dataset as out/<name> (replacing any previous one in one rename); return it."""
    bench = BENCHMARKS[name]
    root = Path(out) / name
    people = identities(ids, seed)
    splits = split_of_ids(ids, bench)
    remove_stale(root.parent, of=root.name)
    with replacing_folder(root) as tmp:  # filled, then renamed: no file is written through an existing link
        records = []
        for pid, (attrs, split) in enumerate(zip(people, splits)):
            for k in range(images_per_id):
                rng = random.Random(f"image-{seed}-{pid}-{k}")
                rel = image_path(bench, pid, k, split)
                save_image(render(attrs, rng, size), tmp / "imgs" / rel)
                captions = [make_caption(attrs, rng) for _ in range(captions_for_image(bench, rng))]
                record = {"split": split, "captions": captions, bench.image_key: rel}
                if bench.writes_tokens:
                    record["processed_tokens"] = [word_tokens(c) for c in captions]
                record["id"] = raw_id(bench, pid)
                records.append(record)
        with open(tmp / bench.annotation_names[0], "w", encoding="utf-8") as f:
            f.write("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n")
    return root


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line interface of the generator."""
    p = argparse.ArgumentParser(description="Write a synthetic pedestrian dataset in a benchmark's raw layout.")
    p.add_argument("--out", type=Path, required=True, help="folder to create <format>/ in")
    p.add_argument("--format", choices=list(BENCHMARKS), required=True, help="raw layout to write")
    p.add_argument("--ids", type=int, default=200, help="number of identities")
    p.add_argument("--images_per_id", "--images-per-id", type=int, default=4, help="images per identity")
    p.add_argument("--seed", type=int, default=0, help="everything drawn is a function of this seed")
    p.add_argument("--size", default=f"{IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}", help="image WIDTHxHEIGHT (default 64x128)")
    p.add_argument("--force", action="store_true", help="replace an existing out/<format>/ folder (once the new one is complete)")
    return p


def main(argv: list[str] | None = None) -> int:
    """The generator's exit status: 0 once the dataset is written, 1 with one message otherwise (2: a bad flag)."""
    return run_main(write_dataset, get_args_parser().parse_args(argv))


def write_dataset(args: argparse.Namespace) -> int:
    """Generate one dataset and print what was written and how long it took."""
    parts = args.size.lower().split("x")
    size = tuple(int(v) for v in parts) if len(parts) == 2 and all(v.isdigit() for v in parts) else (0,)
    if len(size) != 2 or min(size) < 16:
        print(f"synthetic: error: --size {args.size!r} is not WIDTHxHEIGHT with both sides >= 16.", file=sys.stderr)
        return 2
    target = args.out / args.format
    if target.exists() and any(target.iterdir()) and not args.force:
        raise SettingError(f"synthetic: error: {target} already exists and is not empty; pass --force to replace it.")
    start = time.perf_counter()
    try:
        root = generate(args.out, args.format, args.ids, args.images_per_id, args.seed, size)
    except ValueError as err:
        raise SettingError(f"synthetic: error: {err}.") from None
    print(f"wrote {root}: {args.ids} ids x {args.images_per_id} images in {time.perf_counter() - start:.1f} s")
    return 0

if __name__ == "__main__":
    sys.exit(main())
