#!/usr/bin/env bash
# Set up .venv with the runtime and test requirements, lint with ruff (pyproject.toml), then run the test suite
# (extra args go to pytest).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup_env.sh dev
set +u
python -m ruff check .
python -m pytest -q "$@"
