#!/usr/bin/env bash
# Everything we measure on a GPU machine, in one go, within about 8 minutes of wall clock.
#
# Run from the repository root on a fresh GPU machine where torch, timm, typer, rich, pandas and
# matplotlib are installed and fvcore (+ iopath, yacs, termcolor) is importable through PYTHONPATH:
#
#     OUT=/some/folder bash benchmarks/gpu_run.sh
#
# Writes under $OUT: env.txt, gpu/{eager.json,compile.json,gpu.md} (issue 7's table), gpu.md (a
# copy), cli_bench.json, operators_0.7.md / operators_0.5.md (benchmarks/operators.py),
# distance_precision.txt, pareto_bench/ (the built-in demo swept with `tpool pareto --bench`),
# logs/<section>.log and sections.txt (exit status and seconds per section).
# Every section runs under `timeout` and the script carries on whatever a section does; results
# are written row by row, so a section cut short still leaves what it measured. The sections'
# timeouts add up to 530 s, 575 s with each one's 5 s kill grace: the whole run fits one 600 s
# device call, pip install included.
#
# Tunables (environment): EAGER_BUDGET / COMPILE_BUDGET seconds after which no new variant starts
# (defaults 80 / 80; the section timeouts are these + 40 / + 50), KEEPS (default 0.7,0.5),
# OPS (default: every registered operator, in gpu.py's priority order), STEPS (timed calls per
# repeat, default 20), BATCH (default 256), MODEL (default deit_small_patch16_224), DEVICE
# (default cuda; cpu for a dry run of the script), COMPILE_BACKEND (default inductor; aot_eager
# for a quick dry run).
set -u

OUT="${OUT:?set OUT to the output folder}"
MODEL="${MODEL:-deit_small_patch16_224}"
BATCH="${BATCH:-256}"
KEEPS="${KEEPS:-0.7,0.5}"
STEPS="${STEPS:-20}"
EAGER_BUDGET="${EAGER_BUDGET:-80}"
COMPILE_BUDGET="${COMPILE_BUDGET:-80}"
DEVICE="${DEVICE:-cuda}"
COMPILE_BACKEND="${COMPILE_BACKEND:-inductor}"
OPS_ARG=()
if [ -n "${OPS:-}" ]; then OPS_ARG=(--ops "$OPS"); fi
export HF_HUB_OFFLINE=1
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"

mkdir -p "$OUT/logs" "$OUT/gpu"
T0=$(date +%s)
log() { echo "[$(date +%H:%M:%S) +$(( $(date +%s) - T0 ))s] $*"; }

# section NAME TIMEOUT_S COMMAND...: run it, log its output, record status and duration, never stop
section() {
    local name="$1" limit="$2"; shift 2
    local start=$(date +%s)
    log "=== $name (timeout ${limit}s): $*"
    timeout --kill-after=5 "$limit" "$@" > >(tee "$OUT/logs/$name.log") 2>&1
    local rc=$?
    local took=$(( $(date +%s) - start ))
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then log "=== $name: TIMED OUT after ${took}s (partial results kept)";
    elif [ $rc -ne 0 ]; then log "=== $name: FAILED with exit code $rc after ${took}s";
    else log "=== $name: ok in ${took}s"; fi
    echo "$name rc=$rc seconds=$took" >> "$OUT/sections.txt"
    return 0
}

# 0. What machine is this (the numbers mean nothing without it)
section env 20 bash -c "nvidia-smi; $PY - <<'EOF'
import torch, timm, platform
print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__)
print('gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NONE')
try:
    import fvcore; print('fvcore ok')
except ImportError as exc:
    print('fvcore MISSING (no GMACs):', exc)
EOF"
cp "$OUT/logs/env.log" "$OUT/env.txt" 2>/dev/null

# 1. Eager: baseline, ideal, every operator at each keep rate; sync debug check per operator
section eager $(( EAGER_BUDGET + 40 )) "$PY" benchmarks/gpu.py --mode eager --device "$DEVICE" --model "$MODEL" \
    --batch-size "$BATCH" --keep "$KEEPS" --steps "$STEPS" --time-budget "$EAGER_BUDGET" --out "$OUT/gpu" ${OPS_ARG[@]+"${OPS_ARG[@]}"}

# 2. Each operator next to the DeiT-S block it sits in (op / block, reducing block / ideal), keep 0.7 then 0.5
section operators_0.7 45 bash -c "set -o pipefail; '$PY' benchmarks/operators.py --device '$DEVICE' --batch '$BATCH' --keep 0.7 | tee '$OUT/operators_0.7.md'"
section operators_0.5 35 bash -c "set -o pipefail; '$PY' benchmarks/operators.py --device '$DEVICE' --batch '$BATCH' --keep 0.5 | tee '$OUT/operators_0.5.md'"

# 3. What the float32 distance matmul costs, and which assignments tf32/bf16 would change
section distance_precision 60 bash -c "set -o pipefail; '$PY' benchmarks/distance_precision.py --device '$DEVICE' --batch '$BATCH' | tee '$OUT/distance_precision.txt'"

# 4. The CLI itself (defaults on CUDA: batch 256, bf16), one operator, JSON
section cli_bench 40 "$PY" -m tpool_cli bench --device "$DEVICE" --model "$MODEL" -b "$BATCH" --op topk --keep 0.7 \
    --steps 10 --repeats 2 --format json --output "$OUT/cli_bench.json"

# 4b. A sweep with bench figures on the device: the built-in demo (its data is generated locally)
section pareto_bench 60 "$PY" -m tpool_cli pareto --device "$DEVICE" --keep 0.7 --ops topk,grid,wkmedoids,tome --bench \
    --out "$OUT/pareto_bench" --format json --no-resume

# 5. torch.compile (mode default), last because it is the slowest: all operators at the first keep
#    rate, then the next, until the budget; operators that failed in eager are not compiled; GMACs
#    come from the eager run.
section compile $(( COMPILE_BUDGET + 50 )) "$PY" benchmarks/gpu.py --mode compile --device "$DEVICE" --model "$MODEL" \
    --batch-size "$BATCH" --keep "$KEEPS" --steps "$STEPS" --time-budget "$COMPILE_BUDGET" --no-gmacs \
    --compile-backend "$COMPILE_BACKEND" --skip-failed "$OUT/gpu/eager.json" --out "$OUT/gpu" ${OPS_ARG[@]+"${OPS_ARG[@]}"}

# 6. The Markdown table from whatever the sections left
section render 20 "$PY" benchmarks/gpu.py --render --out "$OUT/gpu"
cp "$OUT/gpu/gpu.md" "$OUT/gpu.md" 2>/dev/null
log "done; sections:"
cat "$OUT/sections.txt"
exit 0
