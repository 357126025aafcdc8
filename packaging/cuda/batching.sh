#!/usr/bin/env bash
# Issue 18's peer benchmark on a GPU machine without network: rbee's batched CUDA worker behind
# `rbee serve` against llama.cpp's llama-server, both from ONE CUDA build of the llama.cpp source
# llama-cpp-python vendors (shared/GPU.md's recipe), so both run the very same kernels.
#
# Brought along (packaging/cuda/prepare_device.sh makes them; the device tool carries them with
# `carry: [".whl", ".gpu"]`): .whl/ (wheels) and .gpu/ (the slimmed llama-cpp-python sdist, the
# default model's tokenizer). Steps, each skipped when a warm machine already has its result:
# install the wheels into $SITE; configure vendor/llama.cpp with CUDA and build the targets
# llama, mtmd and llama-server (about 260 s on 16 cores), then lay out the sdist's llama_cpp
# package in $SITE with every built library in its lib/; write two random-weight models with the
# default model's tokenizer (SmolLM2-shaped Q4_1, TinyLlama-shaped F16); run bench/batching.py
# on each, K = 1, 4, 8, 16 streams of 256 tokens. Results go to $OUT: batching-*.json, report.txt.
#
#   OUT=/tmp/out packaging/cuda/batching.sh            # STAGE=build: only build and write models
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT="${OUT:-/tmp/batching-out}"
SITE="${SITE:-/tmp/rbee-site}"
MODELS="${MODELS:-/tmp/rbee-models}"
BUILD="${BUILD:-/tmp/llama-build}"
CUDA_ARCH="${CUDA_ARCH:-90}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT" "$SITE" "$MODELS"
exec > >(tee -a "$OUT/report.txt") 2>&1
t0=$SECONDS
step() { echo "[$((SECONDS - t0)) s] $*"; }

step "machine: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader); $(nproc) cores"
if [[ ! -f "$SITE/.wheels" ]]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl
    touch "$SITE/.wheels"
fi
export PYTHONPATH="$SITE:$PWD"
export PATH="$PATH:/usr/local/cuda/bin"

if [[ ! -x "$BUILD/bin/llama-server" || ! -f "$SITE/llama_cpp/lib/libllama.so" ]]; then
    step "building llama.cpp (engine and llama-server) for sm_$CUDA_ARCH"
    src="$(mktemp -d)"
    tar -xzf .gpu/llama_cpp_python-*.tar.gz -C "$src" --strip-components=1
    cmake -S "$src/vendor/llama.cpp" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$CUDA_ARCH" -DGGML_NATIVE=OFF \
        -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DCMAKE_CUDA_RUNTIME_LIBRARY=Shared \
        -DCMAKE_SHARED_LINKER_FLAGS=-Wl,--exclude-libs,ALL >"$OUT/build.log" 2>&1
    cmake --build "$BUILD" --target llama mtmd llama-server >>"$OUT/build.log" 2>&1 \
        || { tail -n 40 "$OUT/build.log"; exit 1; }
    rm -rf "$SITE/llama_cpp"
    cp -r "$src/llama_cpp" "$SITE/llama_cpp"
    mkdir -p "$SITE/llama_cpp/lib"
    find "$BUILD" -name '*.so*' -exec cp -a {} "$SITE/llama_cpp/lib/" \;
    rm -rf "$src"
    step "built: $(ls "$SITE/llama_cpp/lib" | paste -sd' ')"
fi
"$PY" -c 'import llama_cpp; print("llama_cpp", llama_cpp.__version__, "gpu offload:", llama_cpp.llama_supports_gpu_offload())'

for shape in smollm2 tinyllama; do
    [[ -f "$MODELS/$shape-shaped.gguf" ]] || "$PY" packaging/cuda/model.py write --shape "$shape" \
        --tokenizer .gpu/tokenizer.json.gz "$MODELS/$shape-shaped.gguf"
done
step "models: $(ls -sh "$MODELS" | tail -n +2 | paste -sd' ')"
[[ "${STAGE:-all}" == build ]] && exit 0

export RBEE_MDNS_INTERFACES=127.0.0.1
for shape in ${SHAPES:-smollm2 tinyllama}; do
    step "benchmark: $shape-shaped"
    PYTHONUNBUFFERED=1 "$PY" bench/batching.py --backend cuda --llama-server "$BUILD/bin/llama-server" \
        --model "$MODELS/$shape-shaped.gguf" --ks "${KS:-1,4,8,16}" --reps "${REPS:-2}" \
        --tokens "${TOKENS:-256}" --json "$OUT/batching-$shape.json"
done
step "done"
