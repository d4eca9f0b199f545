#!/usr/bin/env bash
# Set up .venv with the runtime and test requirements, then run the test suite (extra args go to pytest).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup_env.sh dev
set +u
python -m pytest -q "$@"
