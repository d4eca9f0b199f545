"""Search your own photos with a sentence, using a trained CFine checkpoint.

    python search.py index --checkpoint runs/cuhk/best.pt --images photos/ --out photos.index
    python search.py query --index photos.index "a woman in a red coat" ["another sentence" ...] [--json]
    python search.py serve --index photos.index          # then open http://127.0.0.1:8000/
`index` encodes every image under the folder once; a rerun encodes only new or changed files and drops
deleted ones. `query` and `serve` encode the sentence with the index's checkpoint and rank every indexed
image exactly, as test.py ranks a split's gallery (retrieval/ranking.py, retrieval/text_search.py).
"""
from __future__ import annotations

# ruff: noqa: E402 (the arguments are parsed before the heavy imports: see below)
import argparse
import json
import sys
from pathlib import Path

from engine.settings import AMP_MODES, default_device

SHOWN = 10  # unreadable images listed by name; the rest are counted
THREADS_HELP = ("CPU threads scanning the features (default 1: more help on an idle many-core machine and "
                "can be much slower on a busy one; see retrieval/ranking.py)")
DEVICE_HELP = "cpu, cuda or cuda:N (default: cuda when a GPU is visible, else cpu)"


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Search a folder of photos with a sentence (CFine checkpoint)")
    commands = parser.add_subparsers(dest="command", required=True)

    index = commands.add_parser("index", help="encode the images of a folder into an index (or update it)")
    index.add_argument("--checkpoint", required=True, help="best.pt or last.pt written by train.py")
    index.add_argument("--images", required=True, help="folder searched recursively for jpg/jpeg/png/bmp/webp files")
    index.add_argument("--out", default="search_index", help="index folder to create or update (default: search_index)")
    index.add_argument("--device", help=DEVICE_HELP)
    index.add_argument("--amp", default="auto", choices=AMP_MODES)
    index.add_argument("--batch_size", type=positive_int, default=128)
    index.add_argument("--workers", type=int, default=None, help="image loading processes (default: cores - 1, at most 8)")
    index.add_argument("--no_progress", action="store_true")

    query = commands.add_parser("query", help="rank the indexed images for one or more sentences")
    query.add_argument("--index", required=True, help="folder written by `search.py index`")
    query.add_argument("sentences", nargs="+", metavar="SENTENCE", help="a description of the person to find")
    query.add_argument("--top_k", type=positive_int, default=10)
    query.add_argument("--json", action="store_true", help="one JSON object per sentence instead of a table")
    query.add_argument("--page", help="also draw OUT.png: the sentence and its top-k images (OUT-2.png... for more)")
    query.add_argument("--checkpoint", help="the index's checkpoint if it moved (the same file: its SHA256 is checked)")
    query.add_argument("--device", help=DEVICE_HELP)
    query.add_argument("--threads", type=positive_int, default=1, help=THREADS_HELP)

    serve = commands.add_parser("serve", help="a local web page: a search box and a grid of ranked images")
    serve.add_argument("--index", required=True, help="folder written by `search.py index`")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed at start)")
    serve.add_argument("--checkpoint", help="the index's checkpoint if it moved (the same file: its SHA256 is checked)")
    serve.add_argument("--device", help=DEVICE_HELP)
    serve.add_argument("--threads", type=positive_int, default=1, help=THREADS_HELP)
    return parser


# Run as a script, search.py reads its arguments before the imports below, which load torch (about 10 s): --help
# and a mistyped argument answer at once. Imported as a module (tests, benchmarks), it defines everything as usual.
if __name__ == "__main__":
    ARGS = get_args_parser().parse_args()

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from datasets.build import default_workers
from datasets.transforms import ResizeToUint8, to_model_input
from evaluation.visualize import ranking_page
from models.cfine import retrieval_features
from models.checkpoint import CheckpointError, load_model
from models.precision import autocast, resolve_amp
from retrieval.image_folder import ImageFiles, collate_readable, scan_image_folder
from retrieval.index import FEATURE, SearchIndexError, checkpoint_identity, gather_rows, open_for_update, write_index
from retrieval.page import MAX_K
from retrieval.server import SearchServer
from retrieval.text_search import load_text_search


@torch.no_grad()
def encode_files(model, paths: list[Path], mean_std: str, device: torch.device, amp: str, batch_size: int,
                 workers: int, progress: bool) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]:
    """Retrieval features (M, 3D) fp16 of the readable images, their positions in paths, and (position, why) of the rest."""
    transform = ResizeToUint8(tuple(model.config.clip.vision.image_size))  # as test.py: uint8, normalised on the device
    loader = DataLoader(ImageFiles([str(p) for p in paths], transform), batch_size=batch_size, shuffle=False,
                        num_workers=workers, collate_fn=collate_readable, pin_memory=device.type == "cuda")
    dim = 3 * model.config.width  # [global, lg1, lg2], each D wide (512 CLIP text, 768 bert mode)
    features, positions, failed = [np.empty((0, dim), np.float16)], [np.empty(0, np.int64)], []
    with tqdm(total=len(paths), desc="encode images", unit="img", disable=not progress) as bar:
        for batch in loader:
            failed += batch["failed"]
            if len(batch["positions"]):
                with autocast(device, amp):
                    images = to_model_input(batch["images"].to(device, non_blocking=True), mean_std)
                    encoded = model.encode_images(images)
                features.append(retrieval_features(encoded.float(), FEATURE).half().cpu().numpy())
                positions.append(batch["positions"].numpy())
            bar.update(len(batch["positions"]) + len(batch["failed"]))
    return np.concatenate(features), np.concatenate(positions), failed


def build_index(args: argparse.Namespace) -> int:
    """`index`: encode what is new or changed under --images, reuse the rest, write --out atomically."""
    root, device = Path(args.images), torch.device(args.device)
    if not root.is_dir():
        raise SystemExit(f"--images {root}: no such folder")
    try:
        model, state = load_model(args.checkpoint, device)
        identity = checkpoint_identity(args.checkpoint)
        old = open_for_update(args.out, root, identity)
    except (CheckpointError, SearchIndexError) as error:
        raise SystemExit(str(error)) from None
    images, left_out = scan_image_folder(root)
    if not images and old is None:
        raise SystemExit(f"--images {root}: no .jpg/.jpeg/.png/.bmp/.webp files under it")
    old_row = {image: row for row, image in enumerate(old.images)} if old else {}
    todo = [image for image in images if image not in old_row]
    workers = default_workers() if args.workers is None else args.workers
    features, positions, failed = encode_files(
        model, [root / image.path for image in todo], state.get("args", {}).get("mean_std", "clip"), device,
        resolve_amp(args.amp, device), args.batch_size, workers, progress=not args.no_progress)
    new_row = {todo[p].path: row for row, p in enumerate(positions.tolist())}
    kept = [image for image in images if image in old_row or image.path in new_row]
    part = np.array([0 if image in old_row else 1 for image in kept], dtype=np.int64)
    row = np.array([old_row[image] if image in old_row else new_row[image.path] for image in kept], dtype=np.int64)
    parts = [old.features if old else np.empty((0, features.shape[1]), np.float16), features]
    try:
        write_index(args.out, root, identity, kept, features.shape[1], gather_rows(parts, part, row))
    except SearchIndexError as error:
        raise SystemExit(str(error)) from None
    removed = len({image.path for image in old_row} - {image.path for image in images})
    print(f"{args.out}: {len(kept)} images of {root} (encoded {len(new_row)} new or changed, "
          f"reused {int((part == 0).sum())}, removed {removed} no longer there)")
    for what, names in (("unreadable image(s) skipped (a fixed file is encoded on the next run)",
                         [f"{todo[p].path}: {why}" for p, why in failed]),
                        (f"link(s) left out (they lead outside {root} or nowhere)", left_out)):
        if names:
            print(f"{len(names)} {what}:\n  " + "\n  ".join(names[:SHOWN])
                  + (f"\n  ... and {len(names) - SHOWN} more" if len(names) > SHOWN else ""))
    return 0


def page_paths(page: str, count: int) -> list[Path]:
    """OUT.png for one sentence; OUT.png, OUT-2.png, ... for several."""
    out = Path(page)
    return [out] + [out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}") for i in range(2, count + 1)]


def query_index(args: argparse.Namespace) -> int:
    """`query`: the top-k images of every sentence, as a table or JSON lines, optionally as PNG pages."""
    if any(not s.strip() for s in args.sentences):
        raise SystemExit("query: a SENTENCE is empty; describe the person to find")
    try:
        search = load_text_search(args.index, torch.device(args.device), args.checkpoint, args.threads)
        results = search.search(args.sentences, args.top_k)
    except (CheckpointError, SearchIndexError) as error:
        raise SystemExit(str(error)) from None
    root, total = search.index.image_root, len(search.index.images)
    for sentence, hits in zip(args.sentences, results):
        if args.json:
            print(json.dumps({"query": sentence, "results": [
                {"rank": h.rank, "score": h.score, "path": h.path, "file": str(root / h.path)} for h in hits]},
                ensure_ascii=False))
        else:
            print(f"{sentence!r}: top {len(hits)} of {total} images in {root}")
            print(f"{'rank':>6s} {'score':>7s}  image")
            print("\n".join(f"{h.rank:6d} {h.score:7.4f}  {h.path}" for h in hits) + "\n")
    if args.page:
        for sentence, hits, out in zip(args.sentences, results, page_paths(args.page, len(results))):
            ranking_page(sentence, [str(root / h.path) for h in hits], None, out,
                         title=f"top {len(hits)} of {total} images in {root}",
                         labels=[f"{h.rank}: {h.score:.3f}" for h in hits])
            print(f"wrote {out}", file=sys.stderr)
    return 0


def serve_index(args: argparse.Namespace) -> int:
    """`serve`: the search page on host:port until Ctrl-C."""
    try:
        search = load_text_search(args.index, torch.device(args.device), args.checkpoint, args.threads)
    except (CheckpointError, SearchIndexError) as error:
        raise SystemExit(str(error)) from None
    try:
        server = SearchServer((args.host, args.port), search)
    except OSError as error:
        raise SystemExit(f"--host {args.host} --port {args.port}: cannot listen there ({error.strerror}); "
                         "pass another --port (0 picks a free one)") from None
    host, port = server.server_address[:2]
    print(f"serving {len(search.index.images)} images of {search.index.image_root} at http://{host}:{port}/ "
          f"(up to {MAX_K} results per query; Ctrl-C stops)", flush=True)
    if host not in ("127.0.0.1", "localhost"):
        print(f"note: --host {host} makes the page reachable from other machines", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def main(args: argparse.Namespace) -> int:
    args.device = args.device or default_device()  # decided after parsing: --help needs no torch
    return {"index": build_index, "query": query_index, "serve": serve_index}[args.command](args)


if __name__ == "__main__":
    sys.exit(main(ARGS))
