#!/usr/bin/env bash
# Check a benchmark on disk and write processed_data/<NAME>/{train,val,test}_reid.json + meta.json.
# Usage: bash data.sh <dataset_root> [CUHK-PEDES|ICFG-PEDES|RSTPReid|all] [--out DIR] [--workers N]
#                     [--skip_bad_images] [--force]
set -euo pipefail
if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
    echo "usage: bash data.sh <dataset_root> [CUHK-PEDES|ICFG-PEDES|RSTPReid|all] [--out DIR] [--workers N] [--skip_bad_images] [--force]" >&2
    [ $# -lt 1 ] && exit 2
fi
REPO="$(cd "$(dirname "$0")" && pwd)"  # so it runs from any folder; outputs stay relative to $PWD
exec env PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "${PYTHON:-python}" -m datasets.prepare "$@"
