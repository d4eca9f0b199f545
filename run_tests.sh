#!/usr/bin/env bash
# Set up .venv with the runtime and test requirements, lint with ruff (pyproject.toml), then run the test suite
# (extra args go to pytest). The search page's browser test needs headless Chromium: installed from Debian's
# packages when it is missing and this runs as root; otherwise that one test skips, saying why (with CI=true it
# fails instead, so CI never passes without rendering the page).
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "run_tests.sh: installing Debian's chromium for the search page's browser test"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "run_tests.sh: chromium is missing and this is not root: the browser test will skip" \
             "(install Debian's chromium to run it)"
    fi
fi
source scripts/setup_env.sh dev
set +u
python -m ruff check .
python -m pytest -q "$@"
