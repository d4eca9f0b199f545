"""Search your own photos with a sentence, using a trained CFine checkpoint.

    python search.py index --checkpoint runs/cuhk/best.pt --images photos/ --out photos.index
    python search.py query --index photos.index "a woman in a red coat" ["another sentence" ...] [--json]
    python search.py serve --index photos.index          # then open http://127.0.0.1:8000/
`index` encodes every image under the folder once; a rerun encodes only new or changed files and drops
deleted ones. `query` and `serve` encode the sentence with the index's checkpoint and rank every indexed
image exactly, as test.py ranks a split's gallery (retrieval/ranking.py, retrieval/text_search.py). --checkpoint may
also be a folder written by `python -m scripts.export --format onnx`: its encoders then run in onnxruntime and no
CFine is built (retrieval/search_model.py, docs/export.md). This file only reads the arguments: the work is in
retrieval/ (build_index.py, text_search.py, server.py, search_model.py).
"""
from __future__ import annotations

# ruff: noqa: E402 (the arguments are parsed before the heavy imports: see below)
import argparse
import sys

from engine.settings import AMP_MODES, TABLE, Setting, default_device, flag_type

THREADS_HELP = ("CPU threads scanning the features (default 1: more help on an idle many-core machine and "
                "can be much slower on a busy one; see retrieval/ranking.py)")
DEVICE_HELP = "cpu, cuda or cuda:N (default: cuda when a GPU is visible, else cpu)"
CHECKPOINT_HELP = ("the index's checkpoint if it moved (the same file: its SHA256 is checked), or an exported ONNX folder "
                   "of it (python -m scripts.export), or the checkpoint an exported index came from")
# The settings table's checks (engine/settings.py) for the flags train.py does not have: one-line errors alike.
BATCH_SIZE = flag_type(Setting("batch_size", 128, int, minimum=1))
TOP_K = flag_type(Setting("top_k", 10, int, minimum=1))
THREADS = flag_type(Setting("threads", 1, int, minimum=1))
PORT = flag_type(Setting("port", 8000, int, minimum=0, rule=lambda port: None if port <= 65535 else "an integer from 0 to 65535"))
DEVICE, WORKERS = flag_type(TABLE["device"]), flag_type(TABLE["workers"])


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Search a folder of photos with a sentence (CFine checkpoint)")
    commands = parser.add_subparsers(dest="command", required=True)

    index = commands.add_parser("index", help="encode the images of a folder into an index (or update it)")
    index.add_argument("--checkpoint", required=True, help="best.pt or last.pt written by train.py, or a folder written "
                       "by `python -m scripts.export --format onnx` (runs in onnxruntime)")
    index.add_argument("--images", required=True, help="folder searched recursively for jpg/jpeg/png/bmp/webp files")
    index.add_argument("--out", default="search_index", help="index folder to create or update (default: search_index)")
    index.add_argument("--device", type=DEVICE, help=DEVICE_HELP)
    index.add_argument("--amp", default="auto", choices=AMP_MODES)
    index.add_argument("--batch_size", type=BATCH_SIZE, default=128)
    index.add_argument("--workers", type=WORKERS, default=None, help="image loading processes (default: cores - 1, at most 8)")
    index.add_argument("--no_progress", action="store_true")

    query = commands.add_parser("query", help="rank the indexed images for one or more sentences")
    query.add_argument("--index", required=True, help="folder written by `search.py index`")
    query.add_argument("sentences", nargs="+", metavar="SENTENCE", help="a description of the person to find")
    query.add_argument("--top_k", type=TOP_K, default=10)
    query.add_argument("--json", action="store_true", help="one JSON object per sentence instead of a table")
    query.add_argument("--page", help="also draw OUT.png: the sentence and its top-k images (OUT-2.png... for more)")
    query.add_argument("--checkpoint", help=CHECKPOINT_HELP)
    query.add_argument("--device", type=DEVICE, help=DEVICE_HELP)
    query.add_argument("--threads", type=THREADS, default=1, help=THREADS_HELP)

    serve = commands.add_parser("serve", help="a local web page: a search box and a grid of ranked images")
    serve.add_argument("--index", required=True, help="folder written by `search.py index`")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    serve.add_argument("--port", type=PORT, default=8000, help="0 picks a free port (printed at start)")
    serve.add_argument("--checkpoint", help=CHECKPOINT_HELP)
    serve.add_argument("--device", type=DEVICE, help=DEVICE_HELP)
    serve.add_argument("--threads", type=THREADS, default=1, help=THREADS_HELP)
    return parser


# Run as a script, search.py reads its arguments before the imports below, which load torch (about 10 s): --help
# and a mistyped argument answer at once. Imported as a module (tests, benchmarks), it defines everything as usual.
if __name__ == "__main__":
    ARGS = get_args_parser().parse_args()

from retrieval.build_index import update_index
from retrieval.server import serve
from retrieval.text_search import hits_json, hits_table, load_text_search, write_pages
from utils.distributed import checked_device
from utils.errors import SettingError, run_main


def build_index(args: argparse.Namespace) -> int:
    """`index`: encode what is new or changed under --images, reuse the rest, write --out atomically."""
    print(update_index(args.checkpoint, args.images, args.out, args.device, args.amp, args.batch_size,
                       args.workers, progress=not args.no_progress).summary())
    return 0


def query_index(args: argparse.Namespace) -> int:
    """`query`: the top-k images of every sentence, as a table or JSON lines, optionally as PNG pages."""
    if any(not s.strip() for s in args.sentences):
        raise SettingError("query: a SENTENCE is empty; describe the person to find")
    search = load_text_search(args.index, args.device, args.checkpoint, args.threads)
    results = search.search(args.sentences, args.top_k)
    root, total = search.index.image_root, len(search.index.images)
    for sentence, hits in zip(args.sentences, results):
        print(hits_json(sentence, hits, root) if args.json else hits_table(sentence, hits, root, total) + "\n")
    if args.page:
        for out in write_pages(args.page, args.sentences, results, root, total):
            print(f"wrote {out}", file=sys.stderr)
    return 0


def serve_index(args: argparse.Namespace) -> int:
    """`serve`: the search page on host:port until Ctrl-C."""
    serve(load_text_search(args.index, args.device, args.checkpoint, args.threads), args.host, args.port)
    return 0


def main(args: argparse.Namespace) -> int:
    args.device = checked_device(args.device or default_device())  # after parsing: --help needs no torch
    return {"index": build_index, "query": query_index, "serve": serve_index}[args.command](args)


if __name__ == "__main__":
    sys.exit(run_main(main, ARGS))
