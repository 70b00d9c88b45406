#!/usr/bin/env bash
# One GPU session: calibrate, then bench the paper model with the calibrated profile.
# Usage (repository root, on the GPU machine): OUT=dir bash benchmarks/gpu_session.sh [bench args]
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-/tmp/helix-bench}
PY=${PY:-python3}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw,power.limit --format=csv 2>&1 | tee "$OUT/gpu.txt"
"$PY" -c "import torch, yaml, sympy; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')"
t0=$(date +%s)
"$PY" -m helix_compiler.calibrate ${CAL_ARGS:-} --out "$OUT/h100.yaml" --json "$OUT/calib.json" 2>&1 | tee "$OUT/calib.log"
CH=$("$PY" -c "import json; d=json.load(open('$OUT/calib.json')); print((d['best_chunk_bytes'].get('1') or 33554432) >> 20)" 2>/dev/null || echo 32)
echo "calibrate done in $(( $(date +%s) - t0 )) s; chunk $CH MiB"
"$PY" -m helix_compiler.bench --profile "$OUT/h100.yaml" --chunk-mib "$CH" \
  --out "$OUT/paper-h100.json" --raw-out "$OUT/paper-h100.raw.json" "$@" 2>&1 | tee "$OUT/bench.log"
echo "all done in $(( $(date +%s) - t0 )) s"
