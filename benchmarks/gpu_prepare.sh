#!/usr/bin/env bash
# Run on a machine with pip and a package registry, before a GPU run. Writes the wheels of the runtime packages
# that the GPU machine's image lacks into gpu_wheels/ (ignored by git; the device run carries it), built for that
# image's CPython 3.12 on x86-64 Linux. benchmarks/gpu_checks.sh installs them from there, with no network and only
# when an import is missing. Usage (from any folder):
#     bash benchmarks/gpu_prepare.sh                 # GPU_WHEELS=DIR for another folder, PYTHON=... for another pip
# The image (docs/versions_and_gpu.md) has Python 3.12, torch 2.11, torchvision 0.26, transformers 5.17, numpy,
# Pillow, tqdm, regex and matplotlib, but not ftfy (clip/tokenizer.py) nor wcwidth (which ftfy needs). Nothing else
# that train.py, test.py, search.py or gpu_checks.sh imports is missing (tensorboard, for --tensorboard only, is there).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${GPU_WHEELS:-gpu_wheels}"
PY="${PYTHON:-python3}"
MISSING=("$(grep -E '^ftfy\b' requirements.txt)")  # the bound lives in requirements.txt; wcwidth comes as ftfy's need
# What the image has: a wheel of one of these is dropped, so the image's own version is the one that runs.
IMAGE_HAS="torch torchvision transformers numpy pillow tqdm regex matplotlib"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

partial="$DEST.partial"  # swapped in whole, so a failed download never leaves a half folder for gpu_checks.sh
rm -rf "$partial"
mkdir -p "$partial"
"$PY" -m pip download --quiet --disable-pip-version-check --only-binary=:all: --python-version 3.12 \
    --implementation cp "${PLATFORMS[@]}" --dest "$partial" "${MISSING[@]}"
for wheel in "$partial"/*.whl; do
    name=$(basename "$wheel" | cut -d- -f1 | tr 'A-Z_.' 'a-z--')
    if [[ " $IMAGE_HAS " == *" $name "* ]]; then
        echo "gpu_prepare.sh: dropped $(basename "$wheel") (the image has $name)"
        rm "$wheel"
    fi
done
rm -rf "$DEST"
mv "$partial" "$DEST"
echo "gpu_prepare.sh: $DEST/ ($(du -sh "$DEST" | cut -f1)):"
ls -1 "$DEST"
