#!/usr/bin/env bash
# The GPU checks, as one script (about 6-8 minutes on one H100): CUDA/AMP correctness of a short training
# run, then the benchmarks on the GPU. Each step's output goes to $OUT/<step>.log (OUT defaults to
# gpu_checks_out/); a failing step is reported and the next one still runs. Run from the repository root:
#     bash benchmarks/gpu_checks.sh
# Needs a python with torch (CUDA) + the runtime requirements; encoder_speed also needs open_clip_torch
# (requirements-dev.txt). A machine without ftfy can be given wheels: pip install --no-deps ftfy wcwidth.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_checks_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
failed=()

step() {  # step NAME TIMEOUT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    if timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; then
        tail -n 6 "$OUT/$name.log"
    else
        echo "FAILED (exit $?); last lines:"; tail -n 15 "$OUT/$name.log"; failed+=("$name")
    fi
}

step env 60 bash -c "nvidia-smi; $PY -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())'"
step data 120 bash -c "$PY -m datasets.synthetic --out $OUT/raw --format CUHK-PEDES --ids 120 --images_per_id 4 --seed 0 --force \
    && bash data.sh $OUT/raw CUHK-PEDES --out $OUT/processed_data"
for amp in bf16 fp16; do  # a short real training run per AMP mode, then test.py on its checkpoint
    step "train_$amp" 240 $PY train.py --config configs/demo.json --data_root "$OUT/processed_data" \
        --output_dir "$OUT/train_$amp" --overwrite --device cuda --amp "$amp" --epochs 3 --no_progress
    step "test_$amp" 120 $PY test.py --checkpoint "$OUT/train_$amp/best.pt" --device cuda --amp "$amp" --no_progress
done
step train_throughput 240 $PY benchmarks/train_throughput.py --arch vit_b16 --batch 64 --amp bf16 --device cuda
step head_speed 300 $PY benchmarks/head_speed.py --device cuda --batch_sizes 32 128 --repeats 5
step rank_speed 300 $PY -m benchmarks.rank_speed --device cuda --repeats 3
step encoder_speed 240 $PY benchmarks/encoder_speed.py --device cuda --batch 64 --repeats 10 --amp bf16

if [ ${#failed[@]} -gt 0 ]; then
    echo "failed steps: ${failed[*]}"
    exit 1
fi
echo "all GPU checks passed; logs in $OUT/"
