#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv and install the requirements into it.
# Usage: source scripts/setup_env.sh [dev] [bert] [export]  ("dev" adds requirements-dev.txt, which includes
# requirements-bert.txt and requirements-export.txt; "bert" adds only requirements-bert.txt, for --text_encoder bert;
# "export" adds only requirements-export.txt, for `python -m scripts.export --format onnx` and exported ONNX folders)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$repo/.venv}"
if [ ! -x "$venv/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$venv"
fi
files=(-r "$repo/requirements.txt")
for extra in "$@"; do
    case "$extra" in
        dev) files+=(-r "$repo/requirements-dev.txt") ;;
        bert) files+=(-r "$repo/requirements-bert.txt") ;;
        export) files+=(-r "$repo/requirements-export.txt") ;;
        *) echo "setup_env.sh: unknown extra '$extra' (use dev, bert and/or export)" >&2; return 2 2>/dev/null || exit 2 ;;
    esac
done
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${files[@]}"
export PATH="$venv/bin:$PATH"
