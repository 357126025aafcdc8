#!/usr/bin/env bash
# Issue 18's peer benchmark on a GPU machine without network: rbee's batched CUDA worker behind
# `rbee serve` against llama.cpp's llama-server, both from ONE CUDA build of the llama.cpp source
# llama-cpp-python vendors (shared/GPU.md's recipe), so both run the very same kernels.
#
# packaging/cuda/setup.sh installs the carried wheels, builds the engine and llama-server (about
# 260 s on 16 cores) and writes two random-weight models with the default model's tokenizer
# (SmolLM2-shaped Q4_1, TinyLlama-shaped F16); then bench/batching.py runs on each, K = 1, 4, 8,
# 16 streams of 256 tokens. Results go to $OUT: batching-*.json, report.txt.
#
#   OUT=/tmp/out packaging/cuda/batching.sh            # STAGE=build: only build and write models
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT="${OUT:-/tmp/batching-out}"
source packaging/cuda/setup.sh
[[ "${STAGE:-all}" == build ]] && exit 0

for shape in ${SHAPES:-smollm2 tinyllama}; do
    step "benchmark: $shape-shaped"
    PYTHONUNBUFFERED=1 "$PY" bench/batching.py --backend cuda --llama-server "$BUILD/bin/llama-server" \
        --model "$MODELS/$shape-shaped.gguf" --ks "${KS:-1,4,8,16}" --reps "${REPS:-2}" \
        --tokens "${TOKENS:-256}" --json "$OUT/batching-$shape.json" --hive-log "$OUT/hive-$shape.log"
done
step "done"
