#!/usr/bin/env bash
# Correctness of the rank graphs under real NCCL on the GPUs of one host: `helix run` of the
# paper model scaled down (q/k/v/o biases: the row-parallel bias rides in one rank's GEMM) and
# of a small HF LLaMA with GQA (its causal mask runs as is_causal) on every split of N GPUs,
# fp32 and fp16, each rank against the unsharded model.
# With SP=1 also sequence-parallel norms (reduce-scatter; the all-gather in place for a batch of
# 1, tests/spec_batch1.py) in fp32; ONLY_SP=1 runs only those.
# Usage (repository root, on a GPU machine): OUT=dir N=2 [SP=1] [ONLY_SP=1] bash benchmarks/nccl_check.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-/tmp/helix-nccl}; N=${N:-2}; PY=${PY:-python3}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1
splits=$("$PY" -c "n=$N; print(' '.join(f'{m},{n//m}' for m in range(1, n+1) if n % m == 0))")
for model in $([ "${ONLY_SP:-0}" = 1 ] || echo "default examples/llama_gqa.py"); do
  [ "$model" = default ] && model=""
  name=${model:-paper_scaled}; name=$(basename "$name" .py)
  for p in $splits; do
    for dt in float32 float16; do
      "$PY" -m helix_compiler.cli run $model --devices "$N" --backend nccl --plan "$p" \
        --dtype "$dt" --json "$OUT/${name}_${p/,/x}_${dt}.json" 2>&1 | tail -1
    done
  done
done
if [ "${SP:-0}" = 1 ]; then   # sequence-parallel norms: reduce-scatter and all-gather on NCCL
  for model in default examples/llama_gqa.py tests/spec_batch1.py; do
    [ "$model" = default ] && model=""
    name=${model:-paper_scaled}; name=$(basename "$name" .py)
    "$PY" -m helix_compiler.cli run $model --devices "$N" --backend nccl --sequence-parallel \
      --json "$OUT/${name}_sp.json" 2>&1 | tail -1
  done
fi
