# Sourced by the GPU runs (packaging/cuda/batching.sh, placement.sh) on a machine without
# network: install the carried wheels, build llama.cpp with CUDA ONCE for both the engine and
# llama-server (shared/GPU.md's recipe: the same kernels on both sides), lay out llama_cpp with
# every built library, write the random-weight models. Each step is skipped when a warm machine
# already has its result.
#
# Brought along (packaging/cuda/prepare_device.sh makes them; the device tool carries them with
# `carry: [".whl", ".gpu"]`): .whl/ (wheels) and .gpu/ (the slimmed llama-cpp-python sdist, the
# default model's tokenizer). Sets OUT, SITE, MODELS, BUILD, PY, PYTHONPATH, PATH and `step`.
OUT="${OUT:-/tmp/gpu-out}"
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

# GGML_RPC as shared/GPU.md says: lent memory (packaging/cuda/lend_gpu.sh) needs libggml-rpc.so;
# a warm machine's build without it is reconfigured and rebuilt where it changed. RDMA off:
# with libibverbs on the machine ggml-rpc negotiates RDMA, and its client segfaulted in
# ggml_backend_rpc_add_server on the H100 machine (2026-12-07); rbee's RPC runs over loopback.
# A warm machine's build from before RDMA was turned off is rebuilt too (its CMakeCache says so;
# rbee.rpc also sets GGML_RPC_NO_RDMA, which such a build obeys).
if [[ ! -x "$BUILD/bin/llama-server" || ! -f "$SITE/llama_cpp/lib/libggml-rpc.so" ]] \
    || ! grep -qx 'GGML_RPC_RDMA:BOOL=OFF' "$BUILD/CMakeCache.txt"; then
    step "building llama.cpp (engine and llama-server) for sm_$CUDA_ARCH"
    src="$(mktemp -d)"
    tar -xzf .gpu/llama_cpp_python-*.tar.gz -C "$src" --strip-components=1
    cmake -S "$src/vendor/llama.cpp" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$CUDA_ARCH" -DGGML_NATIVE=OFF \
        -DBUILD_SHARED_LIBS=ON -DGGML_RPC=ON -DGGML_RPC_RDMA=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
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
export RBEE_MDNS_INTERFACES=127.0.0.1
