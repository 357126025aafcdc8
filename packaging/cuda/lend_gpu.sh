#!/usr/bin/env bash
# Issue 20 on a GPU machine without network: memory lent by a GPU. packaging/cuda/setup.sh
# builds the CUDA engine (with GGML_RPC) and writes the random-weight models; then
# packaging/cuda/lend_gpu.py runs each model whole on the CPU, whole on the GPU, split CPU +
# local GPU, and split CPU + a GPU lender (`rbee lender --device CUDA0` on loopback, then one
# that a lending hive starts by itself), compares the greedy texts and reads the lender's VRAM.
# Results go to $OUT: lend-gpu-*.json, report.txt. Exit code 1 when a lent text differs from the
# local split's or no VRAM was used.
#
#   OUT=/tmp/out packaging/cuda/lend_gpu.sh        # SHAPES="smollm2" LENT=16 TOKENS=64
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT="${OUT:-/tmp/lend-gpu-out}"
TARGETS="${TARGETS:-llama}"  # no llama-server, no mtmd (build.sh has LLAVA_BUILD off): quicker
source packaging/cuda/setup.sh
nvidia-smi --query-gpu=memory.used,memory.total --format=csv,noheader
status=0
for shape in ${SHAPES:-smollm2 tinyllama}; do
    step "lending a GPU: $shape-shaped"
    PYTHONUNBUFFERED=1 "$PY" packaging/cuda/lend_gpu.py --model "$MODELS/$shape-shaped.gguf" \
        --lent "${LENT:-12}" --tokens "${TOKENS:-64}" --threads "${THREADS:-8}" \
        --json "$OUT/lend-gpu-$shape.json" || status=1
done
step "done (status $status)"
exit $status
