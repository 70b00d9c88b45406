#!/usr/bin/env bash
# What the eighth session built and could not time (docs/BENCHMARKS.md, "Not yet timed"), in
# one device call of about 6 minutes on an H200:
#   1. the s = 1 split-KV core reading the cache un-repeated, on the chosen plan's TP=8 rank
#   2. the cache split where it is the planner's choice (one sequence of 1M), both sides fused
#      and under torch.compile
#   3. the latency choice (helix m=1 x n=16 with SP norms), the same split without them, and the
#      compiled Megatron TP=16, in one suite call ("helix m=1 x n=16" selects both helix kinds)
# (steps 1-3 ran in the ninth session: docs/BENCHMARKS.md). What the ninth session built and
# could not time, about 4 minutes:
#   4. compile_decoder's default split-KV choice (auto) on the GPU: the chosen TP=8 rank at
#      128k x 2 (auto picks split-KV) and TP=64 at 32k x 8 (auto keeps SDPA)
#   5. the latency pair again, with helix's collectives registered through torch.library.Library
#      (8.5 us a call on the CPU instead of 20.7): the plain rank's host exposure
#   6. the cache split (s=8 x n=8) and TP=64 with the split-KV core (its best setting there),
#      in one call, at 512k x 1, 512k x 2 and 1M x 1, with the compiled steps' kernel profiles
#      (where the s=8 rank's 84 us a layer goes)
# (steps 4-6 ran in the tenth session.) The rows where the bandwidth floor puts 0.7x TP=64 in
# reach and that were not yet timed (decode_plan's `floor_ratio`; docs/BENCHMARKS.md), about 7
# minutes in two calls:
#   7. the cache split (s=8 x n=8, the choice) and TP=64 at 512k x 4 and 1M x 2, and at 256k x 4
#      (where the choice is dp=4 x TP=16, step 8); TP=64 again with the split-KV core
#   8. the chosen replicated plans' ranks at one sequence of 256k: TP=16 (dp=4, 4 sequences) and
#      TP=8 (dp=8, 8 sequences), and TP=64 at 256k x 8 (SDPA, then split-KV)
#   9. (steps 7-9 ran in the tenth session) the TP=16 rank at 256k x 1 again, now that its
#      split-KV core reads its one kv head's cache once for its 4 query heads (step 8 timed it
#      reading the cache once per query head: gqa_fold._sliced_repeat), about 1 minute
# Usage (repository root, on the GPU machine):  OUT=dir bash benchmarks/gpu_next.sh [1-9 ...]
# (default: 9)
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-/tmp/helix-next}
PY=${PY:-python3}
mkdir -p "$OUT"
STEPS=${*:-9}
D=benchmarks/gpu_decode_compiled.py
F="--ks 2,6 --iters 100 --warmup 20 --inductor --no-mirror"
for step in $STEPS; do
  case $step in [1-9]) ;; *) echo "gpu_next.sh: unknown step $step (1 to 9)" >&2; exit 2 ;; esac
done
t0=$(date +%s)
for step in $STEPS; do
  case $step in
    1) "$PY" $D --devices 8 --plans 1,1,8 --configs 32768:1,32768:2,131072:1,131072:2 $F \
         --split-kv-core on --profile --out "$OUT/decode_compiled_h200_tp8_splitkv_unrepeated.json" ;;
    2) "$PY" $D --devices 64 --plans "8,1,8;1,1,64" --configs 1048576:1 $F \
         --out "$OUT/decode_compiled_h200_1m_fused.json" ;;
    3) "$PY" -m helix_compiler.cli bench --model space --only "helix m=1 x n=16" "megatron TP=16" \
         --soak-s 1 --profile helix_compiler/planning/profiles/h200.yaml \
         --raw-out "$OUT/space_latency_pair.raw.json" --out "$OUT/space_latency_pair.json" \
         --deadline-s 200 ;;
    4) "$PY" $D --devices 8 --plans 1,1,8 --configs 131072:2 $F \
         --out "$OUT/decode_compiled_h200_auto_tp8_128k2.json"
       "$PY" $D --devices 64 --plans 1,1,64 --configs 32768:8 $F \
         --out "$OUT/decode_compiled_h200_auto_tp64_32k8.json" ;;
    5) "$PY" benchmarks/gpu_rank_profile.py --out "$OUT/rank_profile_library_h200.json" ;;
    6) "$PY" $D --devices 64 --plans "8,1,8;1,1,64" --configs 524288:1,524288:2,1048576:1 $F \
         --split-kv-core on --profile --out "$OUT/decode_compiled_h200_cache_split_pair.json" ;;
    7) "$PY" $D --devices 64 --plans "8,1,8;1,1,64" --configs 524288:4,1048576:2,262144:4 $F \
         --out "$OUT/decode_compiled_h200_cache_split_2m.json"
       "$PY" $D --devices 64 --plans 1,1,64 --configs 524288:4,1048576:2,262144:4 $F \
         --split-kv-core on --out "$OUT/decode_compiled_h200_tp64_splitkv_2m.json" ;;
    8) "$PY" $D --devices 16 --plans 1,1,16 --configs 262144:1 $F \
         --out "$OUT/decode_compiled_h200_tp16_256k1.json"
       "$PY" $D --devices 8 --plans 1,1,8 --configs 262144:1 $F \
         --out "$OUT/decode_compiled_h200_tp8_256k1.json"
       "$PY" $D --devices 64 --plans 1,1,64 --configs 262144:8 $F \
         --out "$OUT/decode_compiled_h200_tp64_256k8.json"
       "$PY" $D --devices 64 --plans 1,1,64 --configs 262144:8 $F --split-kv-core on \
         --out "$OUT/decode_compiled_h200_tp64_splitkv_256k8.json" ;;
    9) "$PY" $D --devices 16 --plans 1,1,16 --configs 262144:1 $F --profile \
         --out "$OUT/decode_compiled_h200_tp16_256k1_unrepeated.json" ;;
  esac 2>&1 | grep -v -i warning | tail -40
  echo "step $step done at $(( $(date +%s) - t0 )) s"
done
