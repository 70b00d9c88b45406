#!/usr/bin/env bash
# One GPU session: calibrate, then bench the paper model with the calibrated profile, then
# (GQA=1) the LLaMA-style GQA model with the same profile.
# Usage (repository root, on the GPU machine):
#   OUT=dir [GQA=1 GQA_ARGS="..."] bash benchmarks/gpu_session.sh [paper bench args]
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-/tmp/helix-bench}
PY=${PY:-python3}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw,power.limit --format=csv 2>&1 | tee "$OUT/gpu.txt"
"$PY" -c "import torch, yaml, sympy; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')"
t0=$(date +%s)
"$PY" -m helix_compiler.cli calibrate ${CAL_ARGS:-} --out "$OUT/h100.yaml" --json "$OUT/calib.json" 2>&1 | tee -a "$OUT/session.log"
CH=$("$PY" -c "import json; d=json.load(open('$OUT/calib.json')); print((d['best_chunk_bytes'].get('1') or 33554432) >> 20)" 2>/dev/null || echo 32)
echo "calibrate done in $(( $(date +%s) - t0 )) s; chunk $CH MiB"
"$PY" -m helix_compiler.cli bench --profile "$OUT/h100.yaml" --chunk-mib "$CH" \
  --out "$OUT/paper-h100.json" --raw-out "$OUT/paper-h100.raw.json" "$@" 2>&1 | tee -a "$OUT/session.log"
if [ "${GQA:-0}" = 1 ]; then
  "$PY" -m helix_compiler.cli bench --model gqa --profile "$OUT/h100.yaml" --out "$OUT/gqa-h100.json" \
    --raw-out "$OUT/gqa-h100.raw.json" ${GQA_ARGS:-} 2>&1 | tee -a "$OUT/session.log" | tail -40
fi
echo "all done in $(( $(date +%s) - t0 )) s"
