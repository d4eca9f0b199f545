#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv and install the requirements into it.
# Usage: source scripts/setup_env.sh [dev]      ("dev" adds requirements-dev.txt)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$repo/.venv}"
if [ ! -x "$venv/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$venv"
fi
files=(-r "$repo/requirements.txt")
if [ "${1:-}" = "dev" ]; then
    files+=(-r "$repo/requirements-dev.txt")
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${files[@]}"
export PATH="$venv/bin:$PATH"
