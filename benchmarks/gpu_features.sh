#!/usr/bin/env bash
# GradGuard's GPU feature checks, about a minute on an H100 (two minutes at most):
#   16-mixed on CUDA with a planted overflow (one skipped step counted, norms unscaled), fused Adam under 16-mixed,
#   Lightning's FSDPStrategy on one GPU with a planted unused layer, a torch.compile'd model (Inductor).
# Prints a Markdown table (paste it into the README) and writes every figure to $OUT/gpu_features.json
# (or ./gpu_features.json). Needs torch with CUDA and lightning; the package is imported from this checkout.
# Exit status: 0 all passed, 1 a check failed, 124 the time limit was hit.
set -uo pipefail
cd "$(dirname "$0")/.."
out_dir="${OUT:-.}"
mkdir -p "$out_dir"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONWARNINGS="ignore"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
timeout "${GRADGUARD_FEATURES_TIMEOUT:-150}" python benchmarks/gpu_features.py --json "$out_dir/gpu_features.json" \
    2> >(grep -v -e "^$" -e "LeafSpec" -e "litlogger" >&2)
status=$?
echo "gpu_features exit status: $status"
exit $status
