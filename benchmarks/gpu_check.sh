#!/usr/bin/env bash
# GradGuard's GPU checks, for one H100 or H200 (about 3.5 minutes on an H200; 3 without the features):
#   1. sync_check.py     non-logging steps under torch.cuda.set_sync_debug_mode("error"), logged norms verified
#   2. norm_throughput   per-parameter norms of every GPT-2-small gradient: effective TB/s (target >= 2.0)
#   3. overhead.py       the gpu preset: no callback / GradGuard defaults / logging every step / Lightning recipe
#   4. gpu_adapters.py   watch() under fp16 + GradScaler + fused Adam, a Fabric GAN, the Hugging Face Trainer, strict
#                        mode, the Trainer under 16-mixed with accumulation
#   5. gpu_features.sh   16-mixed overflow, fused Adam, Lightning FSDPStrategy, torch.compile
# Results (JSON and text) go to $OUT when it is set, else to benchmarks/out/.
# Usage: bash benchmarks/gpu_check.sh                 (from anywhere; runs against this checkout)
#        bash benchmarks/gpu_check.sh --no-features    (steps 1-4 only)
#        bash benchmarks/gpu_check.sh --smoke          (CPU, tiny model, steps 1-4: checks the scripts themselves)
set -uo pipefail

cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's lightning_gradguard, installed or not
OUT="${OUT:-$PWD/benchmarks/out}"
export OUT
mkdir -p "$OUT"

features=1
if [[ "${1:-}" == "--no-features" ]]; then
    features=0
fi
if [[ "${1:-}" == "--smoke" ]]; then
    features=0
    device=(--device cpu)
    preset=tiny
    overhead_args=(--rounds 1 --steps 2 --warmup 1)
else
    device=(--device cuda)
    preset=gpu
    overhead_args=()
fi

status=0
run() {  # run NAME TIMEOUT_S COMMAND...: tee the output to $OUT/NAME.txt, remember a failure, go on
    local name=$1 limit=$2
    shift 2
    echo "=== $name: $*"
    timeout "$limit" "$@" 2>&1 | grep -v -E "Tip:|litlogger|available: |LOCAL_RANK|^\s*$" | tee "$OUT/$name.txt"
    local rc=${PIPESTATUS[0]}
    if [[ $rc -ne 0 ]]; then
        echo "=== $name FAILED (exit $rc)"
        status=1
    fi
}

{
    date -u
    python -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv 2>/dev/null || true
} | tee "$OUT/environment.txt"

run sync-check 120 python benchmarks/sync_check.py --preset "$preset" "${device[@]}"
run norm-throughput 60 python benchmarks/norm_throughput.py --preset "$preset" "${device[@]}"
run overhead 150 python benchmarks/overhead.py --preset "$preset" "${device[@]}" "${overhead_args[@]}"
run adapters 180 python benchmarks/gpu_adapters.py "${device[@]}" --json "$OUT/gpu_adapters.json"
if [[ $features -eq 1 ]]; then
    run features 160 bash benchmarks/gpu_features.sh
fi

echo "=== results in $OUT"
ls -1 "$OUT"
exit $status
