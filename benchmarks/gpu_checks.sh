#!/usr/bin/env bash
# Every GPU question in one lease: at most 475 s of step timeouts (under 8 minutes), the most important first.
# Writes $OUT/summary.json (one JSON object: a key per step, plus "steps": ok/failed/skipped per step) and a
# log per step, $OUT/<step>.log. Run from any folder:
#     OUT=/some/folder bash benchmarks/gpu_checks.sh          # a GPU: ViT-B/16, 224x224, batch 64, bf16
#     DEVICE=cpu OUT=/tmp/checks bash benchmarks/gpu_checks.sh   # CPU dry run: tiny model, small data (~1-2 min)
# Needs a python with torch + the runtime requirements only (no open_clip). COMPILE=off skips the compiled run.
# Steps: env, data (synthetic ~100x300 JPEGs), train_eager / train_compile (train.py end to end with the real
# loader; pairs/s from metrics.jsonl), throughput, precision (fp32/bf16/fp16 loss parts, gradient cosine; CUDA vs
# CPU fp32), sync (set_sync_debug_mode warnings in two steps), memory (batch 32/64/128, whole and --chunk_size 8), eval (CUHK-PEDES test
# size by phase), checkpoint (save time and size), summary.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_checks_out}"
DEVICE="${DEVICE:-cuda}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
: > "$OUT/status.txt"
rm -f "$OUT"/*.json

if [ "$DEVICE" = cpu ]; then  # the dry run: the same steps at toy sizes
    ARCH=tiny; SIZE="64 32"; BATCH=16; IDS=40; IMG=64x128; EPOCHS=2; COMPILE="${COMPILE:-off}"; SCALE=0.05
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
else
    ARCH=vit_b16; SIZE="224 224"; BATCH=64; IDS=300; IMG=100x300; EPOCHS=3; COMPILE="${COMPILE:-inductor}"; SCALE=1
fi
PROBE=("$PY" -m benchmarks.gpu_probe --out "$OUT" --device "$DEVICE" --arch "$ARCH")

step() {  # step NAME TIMEOUT_S COMMAND...: run it, log it, record ok/failed in status.txt
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    if timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; then
        echo "$name ok" >> "$OUT/status.txt"; tail -n 3 "$OUT/$name.log" | cut -c1-300
    else
        echo "$name failed (exit $?)" >> "$OUT/status.txt"; echo "FAILED; last lines:"; tail -n 10 "$OUT/$name.log"
    fi
}

TRAIN=("$PY" train.py --data_root "$OUT/processed_data" --dataset CUHK-PEDES --overwrite --clip none
       --clip_arch "$ARCH" --image_size $SIZE --batch_size "$BATCH" --amp bf16 --device "$DEVICE" --epochs "$EPOCHS"
       --eval_every "$EPOCHS" --warmup_epochs 1 --no_progress)  # epoch 1 warms up; later epochs are warm

step env 15 "${PROBE[@]}" env
step data 45 bash -c "$PY -m datasets.synthetic --out '$OUT/raw' --format CUHK-PEDES --ids $IDS --images_per_id 4 \
    --size $IMG --seed 0 --force && bash data.sh '$OUT/raw' CUHK-PEDES --out '$OUT/processed_data' --force"
step train_eager 90 "${TRAIN[@]}" --output_dir "$OUT/train_eager" --compile off
if [ "$COMPILE" != off ]; then
    step train_compile 150 "${TRAIN[@]}" --output_dir "$OUT/train_compile" --compile "$COMPILE"
else
    echo "train_compile skipped (COMPILE=off)" >> "$OUT/status.txt"
fi
step throughput 15 "${PROBE[@]}" throughput "$OUT/train_eager" "$OUT/train_compile"
step precision 35 "${PROBE[@]}" precision --batch 32
step sync 25 "${PROBE[@]}" sync --batch "$BATCH"
step memory 35 "${PROBE[@]}" memory --batches 32 64 128
step eval 30 "${PROBE[@]}" eval --eval_scale "$SCALE"
step checkpoint 20 "${PROBE[@]}" checkpoint --scratch "$OUT"
step summary 15 "${PROBE[@]}" summary
echo "summary: $OUT/summary.json"
! grep -q failed "$OUT/status.txt"
