#!/usr/bin/env bash
# The GPU run rehearsed on a CPU: builds (or reuses) a virtual environment outside the repository holding exactly
# the GPU image's packages (docs/versions_and_gpu.md: Python 3.12, torch 2.11.0, torchvision 0.26.0,
# transformers 5.17.0, matplotlib, tqdm, regex, Pillow, numpy; no ftfy), prepares gpu_wheels/ if it is missing,
# then runs `DEVICE=cpu bash benchmarks/gpu_checks.sh` with that python, which has to take ftfy and wcwidth from
# gpu_wheels/ alone, and prints summary.json. Exits non-zero unless every step passed with them installed that way.
# Usage: bash benchmarks/image_dry_run.sh   (IMAGE_VENV=DIR, OUT=DIR, PYTHON312=/path/to/python3.12 to override)
# The first build downloads torch's CUDA wheels from the registry (about 4 GB installed); later runs reuse it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${IMAGE_VENV:-$HOME/.cache/cfine-venvs/image}"
OUT="${OUT:-/tmp/cfine_image_dry_run}"
IMAGE=(torch==2.11.0 torchvision==0.26.0 transformers==5.17.0 matplotlib tqdm regex Pillow numpy)
case "$(realpath -m "$VENV")/" in "$(pwd -P)"/*) echo "image_dry_run.sh: keep IMAGE_VENV outside the repository" >&2; exit 2 ;; esac

image_matches() {  # the venv's versions are the image's, and ftfy is absent
    "$VENV/bin/python" -c 'import importlib.util, sys, torch, torchvision, transformers
ok = (sys.version_info[:2] == (3, 12) and torch.__version__.split("+")[0] == "2.11.0"
      and torchvision.__version__.split("+")[0] == "0.26.0" and transformers.__version__ == "5.17.0")
sys.exit(0 if ok and importlib.util.find_spec("ftfy") is None and importlib.util.find_spec("wcwidth") is None else 1)' 2>/dev/null
}
if [ ! -x "$VENV/bin/python" ] || ! image_matches; then
    py312=""  # the first candidate that runs (pyenv's shim is on PATH but fails where 3.12 is not selected)
    for candidate in ${PYTHON312:-} python3.12 /root/.pyenv/versions/3.12*/bin/python3.12; do
        if "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then py312=$candidate; break; fi
    done
    [ -n "$py312" ] || { echo "image_dry_run.sh: no python3.12 found (set PYTHON312=...)" >&2; exit 2; }
    echo "image_dry_run.sh: building $VENV with $("$py312" --version) and ${IMAGE[*]}"
    rm -rf "$VENV"
    "$py312" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${IMAGE[@]}"
    image_matches || { echo "image_dry_run.sh: $VENV does not hold the image's versions (or has ftfy)" >&2; exit 1; }
fi
compgen -G "${GPU_WHEELS:-gpu_wheels}/*.whl" > /dev/null || PYTHON='' bash benchmarks/gpu_prepare.sh

status=0
DEVICE=cpu OUT="$OUT" PYTHON="$VENV/bin/python" PYTHONPATH='' bash benchmarks/gpu_checks.sh || status=$?
cat "$OUT/summary.json" 2>/dev/null || echo "image_dry_run.sh: no $OUT/summary.json"
"$VENV/bin/python" - "$OUT/summary.json" <<'EOF' || status=1
import json, sys
summary = json.load(open(sys.argv[1]))
bad = {step: result for step, result in summary["steps"].items() if result != "ok" and not result.startswith("skipped")}
got = {name.split("==")[0] for name in summary["wheels"]["installed_from_folder"]}
if bad or not {"ftfy", "wcwidth"} <= got:
    sys.exit(f"image_dry_run.sh: steps not ok: {bad}; installed from the folder: {sorted(got)} (expected ftfy and wcwidth)")
print(f"image_dry_run.sh: every step ok with {sorted(got)} from the folder")
EOF
exit "$status"
