#!/usr/bin/env bash
# Every GPU question in one lease: at most 500 s of step limits (8 min 20 s), the most important first.
# Writes $OUT/summary.json (one JSON object: a key per step, "wheels": what came from gpu_wheels/, and "steps":
# ok/failed/skipped per step) and a log per step, $OUT/<step>.log. Run from any folder:
#     OUT=/some/folder bash benchmarks/gpu_checks.sh          # a GPU: ViT-B/16, 224x224, batch 64, bf16
#     DEVICE=cpu OUT=/tmp/checks bash benchmarks/gpu_checks.sh   # CPU dry run: tiny model, small data (~1-2 min)
# Needs a python with the runtime requirements only (no open_clip). COMPILE=off skips the compiled run. Where an
# import is missing (the GPU image has no ftfy), it installs the wheels that benchmarks/gpu_prepare.sh wrote into
# gpu_wheels/ (GPU_WHEELS=DIR for another folder) into a temporary folder on PYTHONPATH: nothing is downloaded.
# Steps: env, data (synthetic ~100x300 JPEGs), train_eager / train_compile (train.py end to end with the real
# loader; pairs/s from metrics.jsonl), throughput, precision (fp32/bf16/fp16 loss parts, gradient cosine; CUDA vs
# CPU fp32), sync (set_sync_debug_mode warnings in two steps), memory (batch 32/64/128, whole and --chunk_size 8), eval (CUHK-PEDES test
# size by phase), checkpoint (save time and size), summary.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUT="${OUT:-gpu_checks_out}"
DEVICE="${DEVICE:-cuda}"
# Every limit below is the GPU's; a CPU dry run (on a shared machine) gets LIMIT_SCALE times as long.
LIMIT_SCALE="${LIMIT_SCALE:-$([ "$DEVICE" = cpu ] && echo 3 || echo 1)}"
limit() { echo $(($1 * LIMIT_SCALE)); }
PY="${PYTHON:-python3}"
export PYTHON="$PY"  # data.sh's python
WHEELS="${GPU_WHEELS:-gpu_wheels}"
mkdir -p "$OUT"
: > "$OUT/status.txt"
rm -f "$OUT"/*.json

# The runtime's imports (requirements.txt). torch and torchvision are only looked up: the env step imports them.
missing_imports() {  # missing_imports LIMIT_S
    timeout "$(limit "$1")" "$PY" -c 'import importlib, importlib.util, sys
def present(name):
    try:
        return importlib.util.find_spec(name) is not None if name in ("torch", "torchvision") else bool(importlib.import_module(name))
    except Exception:
        return False
print(" ".join(name for name in sys.argv[1:] if not present(name)))' torch torchvision numpy PIL tqdm ftfy regex matplotlib
}
deps_started=$SECONDS
missing=$(missing_imports 10) || { echo "gpu_checks.sh: '$PY' did not run (exit $?)" | tee -a "$OUT/status.txt" >&2; exit 2; }
installed=()
if [ -n "$missing" ]; then
    if ! compgen -G "$WHEELS/*.whl" > /dev/null; then
        echo "gpu_checks.sh: $PY cannot import $missing and $WHEELS/ holds no wheels: run 'bash benchmarks/gpu_prepare.sh'" \
             "on a machine with pip first, then carry $WHEELS" | tee -a "$OUT/status.txt" >&2
        exit 2
    fi
    SITE=$(mktemp -d)
    trap 'rm -rf "$SITE"' EXIT
    # The folder's wheels whose distribution this python lacks (one it has keeps its own version).
    mapfile -t wanted < <(timeout "$(limit 5)" "$PY" -c 'import importlib.metadata as md, pathlib, sys
for wheel in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    try:
        md.version(wheel.name.split("-")[0])
    except md.PackageNotFoundError:
        print(wheel)' "$WHEELS")
    if [ ${#wanted[@]} -gt 0 ]; then
        timeout "$(limit 5)" "$PY" -m pip install --isolated --quiet --no-index --no-deps --no-compile --target "$SITE" "${wanted[@]}" \
            || { echo "gpu_checks.sh: pip could not install ${wanted[*]} from $WHEELS/" | tee -a "$OUT/status.txt" >&2; exit 2; }
        for wheel in "${wanted[@]}"; do installed+=("$(basename "$wheel" | cut -d- -f1)==$(basename "$wheel" | cut -d- -f2)"); done
    fi
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    still=$(missing_imports 5)
    if [ -n "$still" ]; then
        echo "gpu_checks.sh: $PY still cannot import $still with $WHEELS/ installed: run 'bash benchmarks/gpu_prepare.sh'" \
             "again (does it list that package?)" | tee -a "$OUT/status.txt" >&2
        exit 2
    fi
fi
json_list() { local IFS=,; local quoted=("${@/#/\"}"); quoted=("${quoted[@]/%/\"}"); echo "[${quoted[*]}]"; }
# shellcheck disable=SC2086  # $missing: a list of words
printf '{"installed_from_folder": %s, "folder": "%s", "missing_imports": %s}\n' "$(json_list "${installed[@]}")" "$WHEELS" \
    "$(json_list $missing)" > "$OUT/wheels.json"
WHEELS_NOTE="wheels installed from $WHEELS/: ${installed[*]:-none}${missing:+ (missing imports: $missing)}; $((SECONDS - deps_started)) s"
echo "$WHEELS_NOTE"

if [ "$DEVICE" = cpu ]; then  # the dry run: the same steps at toy sizes
    ARCH=tiny; SIZE="64 32"; BATCH=16; IDS=40; IMG=64x128; EPOCHS=2; COMPILE="${COMPILE:-off}"; SCALE=0.05
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
else
    ARCH=vit_b16; SIZE="224 224"; BATCH=64; IDS=300; IMG=100x300; EPOCHS=3; COMPILE="${COMPILE:-inductor}"; SCALE=1
fi
PROBE=("$PY" -m benchmarks.gpu_probe --out "$OUT" --device "$DEVICE" --arch "$ARCH")

step() {  # step NAME TIMEOUT_S COMMAND...: run it, log it, record ok/failed in status.txt
    local name=$1 limit started=$SECONDS
    limit=$(limit "$2")
    shift 2
    echo "== $name (limit ${limit}s)"
    if timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; then
        echo "$name ok" >> "$OUT/status.txt"; tail -n 3 "$OUT/$name.log" | cut -c1-300; echo "-- $name: $((SECONDS - started)) s"
    else
        echo "$name failed (exit $?)" >> "$OUT/status.txt"; echo "FAILED after $((SECONDS - started)) s; last lines:"
        tail -n 10 "$OUT/$name.log"
    fi
}

TRAIN=("$PY" train.py --data_root "$OUT/processed_data" --dataset CUHK-PEDES --overwrite --clip none
       --clip_arch "$ARCH" --image_size $SIZE --batch_size "$BATCH" --amp bf16 --device "$DEVICE" --epochs "$EPOCHS"
       --eval_every "$EPOCHS" --warmup_epochs 1 --no_progress)  # epoch 1 warms up; later epochs are warm

step env 15 "${PROBE[@]}" env
step data 45 bash -c "$PY -m datasets.synthetic --out '$OUT/raw' --format CUHK-PEDES --ids $IDS --images_per_id 4 \
    --size $IMG --seed 0 --force && bash data.sh '$OUT/raw' CUHK-PEDES --out '$OUT/processed_data' --force"
step train_eager 90 "${TRAIN[@]}" --output_dir "$OUT/train_eager" --compile off
RUNS=("$OUT/train_eager")
if [ "$COMPILE" != off ]; then
    step train_compile 150 "${TRAIN[@]}" --output_dir "$OUT/train_compile" --compile "$COMPILE"
    RUNS+=("$OUT/train_compile")
else
    echo "train_compile skipped (COMPILE=off)" >> "$OUT/status.txt"
fi
step throughput 15 "${PROBE[@]}" throughput "${RUNS[@]}"
step precision 35 "${PROBE[@]}" precision --batch 32
step sync 25 "${PROBE[@]}" sync --batch "$BATCH"
step memory 35 "${PROBE[@]}" memory --batches 32 64 128
step eval 30 "${PROBE[@]}" eval --eval_scale "$SCALE"
step checkpoint 20 "${PROBE[@]}" checkpoint --scratch "$OUT"
step summary 15 "${PROBE[@]}" summary
echo "summary: $OUT/summary.json; $WHEELS_NOTE"
! grep -q failed "$OUT/status.txt"
