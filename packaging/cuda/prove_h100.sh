#!/usr/bin/env bash
# The whole GPU proof in one command, on a machine with an NVIDIA GPU and no network.
#
# Brought along (packaging/cuda/prepare_device.sh makes them): .whl/ (wheels) and .gpu/ (the
# slimmed llama-cpp-python sdist, the default model's tokenizer). Then, in one go, because the
# 269 MB CUDA wheel cannot be carried back: build llama-cpp-python for this GPU's architecture,
# install it and rbee's dependencies into a scratch folder, write two random-weight Llama models
# (SmolLM2-shaped like the default model, and TinyLlama-shaped, 2.2 GB of F16), and run
# packaging/cuda/prove.py on each: llama-cpp-python in-process against a real hive and CUDA
# worker, memory estimate against what NVML says the worker holds, BACKEND_UNAVAILABLE for a
# device that does not exist. Results go to $OUT (default /tmp/prove-out): report.txt,
# prove.jsonl, build.log.
#
#   OUT=/tmp/out packaging/cuda/prove_h100.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT="${OUT:-/tmp/prove-out}"
SITE="${SITE:-/tmp/rbee-site}"
MODELS="${MODELS:-/tmp/rbee-models}"
CUDA_ARCH="${CUDA_ARCH:-90}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT" "$SITE" "$MODELS"
exec > >(tee -a "$OUT/report.txt") 2>&1
t0=$SECONDS
step() { echo "[$((SECONDS - t0)) s] $*"; }

step "machine: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | paste -sd';'); $(nproc) cores; $("$PY" -V)"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl
export PYTHONPATH="$SITE:$PWD"
if [[ -f .gpu/wiring.patch ]] && ! grep -q "def _place" rbee/hive/provision.py; then
    step "applying the hive wiring (.gpu/wiring.patch)"
    patch -p1 -s <.gpu/wiring.patch
fi

if [[ -f "$SITE/llama_cpp/lib/libggml-cuda.so" ]]; then
    step "reusing the CUDA build already in $SITE (a warm machine)"
else
    step "building llama-cpp-python for sm_$CUDA_ARCH"
    sdist="$(ls .gpu/llama_cpp_python-*.tar.gz)"
    wheel="$(CUDA_ARCH="$CUDA_ARCH" LLAMA_SDIST="$sdist" NO_BUILD_ISOLATION=1 \
        WHEEL_DIR=/tmp/wheels PYTHON="$PY" packaging/cuda/build.sh 2>"$OUT/build.log" | tail -n1)" \
        || { tail -n 40 "$OUT/build.log"; exit 1; }
    grep "cuda/build.sh" "$OUT/build.log" || true
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$wheel"
    step "installed $(basename "$wheel")"
fi
"$PY" - <<'PYEOF'
import llama_cpp
from rbee import gpu
inv = gpu.detect()
print("gpu offload:", llama_cpp.llama_supports_gpu_offload(), "| backends:", inv.announce_text())
print("detected:", inv.describe(), "| driver", inv.driver_version)
PYEOF

L="$SITE/llama_cpp/lib"
echo "libggml-cuda.so exports $(nm -D --defined-only "$L/libggml-cuda.so" | c++filt | grep -c 'std::') std:: symbols; NEEDED: $(readelf -d "$L/libggml-cuda.so" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' | paste -sd' ')"

step "writing the random-weight models"
for shape in smollm2 tinyllama; do
    [[ -f "$MODELS/$shape-shaped.gguf" ]] || "$PY" packaging/cuda/model.py write --shape "$shape" \
        --tokenizer .gpu/tokenizer.json.gz "$MODELS/$shape-shaped.gguf"
done

step "loading on the GPU with pyzmq loaded first (as in a worker)"
if ! "$PY" packaging/cuda/loadcheck.py "$MODELS/smollm2-shaped.gguf" 2>"$OUT/loadcheck.log"; then
    echo "loadcheck failed (exit $?); last lines:"; tail -n 5 "$OUT/loadcheck.log"
    STDCXX="$(g++ -print-file-name=libstdc++.so.6)"
    if LD_PRELOAD="$STDCXX" "$PY" packaging/cuda/loadcheck.py "$MODELS/smollm2-shaped.gguf"; then
        echo "WORKAROUND: LD_PRELOAD=$STDCXX makes it load; measuring with it"
        export LD_PRELOAD="$STDCXX"
    fi
fi

step "measuring"
PYTHONUNBUFFERED=1 "$PY" packaging/cuda/prove.py --backend cuda -n "${TOKENS:-256}" --runs "${RUNS:-12}" \
    --out "$OUT/prove.jsonl" "smollm2=$MODELS/smollm2-shaped.gguf" "tinyllama=$MODELS/tinyllama-shaped.gguf"
step "done"
