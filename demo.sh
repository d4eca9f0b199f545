#!/usr/bin/env bash
# The whole pipeline on a fresh clone, on the CPU, with no download: set up .venv, draw a synthetic
# pedestrian dataset in CUHK-PEDES's raw layout, prepare it with data.sh, train the tiny CLIP-shaped
# demo model from random weights (configs/demo.json), evaluate best.pt and write visualisations.
# Everything lands in demo_run/ (override with DEMO_DIR=...). Extra arguments go to train.py.
set -euo pipefail
cd "$(dirname "$0")"
train_args=("$@")
set --  # a sourced script sees the caller's arguments: give setup_env.sh none
source scripts/setup_env.sh
set +u
DEMO_DIR="${DEMO_DIR:-demo_run}"
export PYTHON=python

echo "== 1/4 synthetic CUHK-PEDES-format data (400 ids x 4 images) -> $DEMO_DIR/raw"
if [ ! -f "$DEMO_DIR/raw/CUHK-PEDES/reid_raw.json" ]; then
    python -m datasets.synthetic --out "$DEMO_DIR/raw" --format CUHK-PEDES --ids 400 --images_per_id 4 --seed 0
else
    echo "already there"
fi

echo "== 2/4 data.sh -> $DEMO_DIR/processed_data"
bash data.sh "$DEMO_DIR/raw" CUHK-PEDES --out "$DEMO_DIR/processed_data"

echo "== 3/4 train.py --config configs/demo.json (replacing an earlier demo run: --overwrite)"
python train.py --config configs/demo.json --data_root "$DEMO_DIR/processed_data" \
    --output_dir "$DEMO_DIR/train" --overwrite "${train_args[@]}"

echo "== 4/4 test.py on the test split, with visualisations and training curves"
python test.py --checkpoint "$DEMO_DIR/train/best.pt" --split test --visualize 8 --plot

echo "Done. Results: $DEMO_DIR/train/metrics.jsonl, $DEMO_DIR/train/eval_test/{metrics.json,visualize/,training_curves.png}"
echo
echo "Search the demo's photos with your own sentence (first 'source .venv/bin/activate'):"
echo "  python search.py index --checkpoint $DEMO_DIR/train/best.pt --images $DEMO_DIR/raw/CUHK-PEDES/imgs --out $DEMO_DIR/search_index"
echo "  python search.py serve --index $DEMO_DIR/search_index      # then open http://127.0.0.1:8000/?q=a+woman+in+a+red+coat"
