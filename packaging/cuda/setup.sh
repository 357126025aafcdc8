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
TARGETS="${TARGETS:-llama mtmd llama-server}"  # what to build (lend_gpu.sh runs no llama-server)
# OFF: no flash-attention kernels (82 of 144 CUDA files), a quicker build for runs that never
# lend. A GPU lender needs them: llama.cpp's RPC client takes every op as supported, so a
# borrower uses flash attention on the lent layers and the lender aborts in fattn.cu.
CUDA_FA="${CUDA_FA:-ON}"
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

# GGML_RPC as shared/GPU.md says: lent memory (packaging/cuda/lend_gpu.sh) needs libggml-rpc.so.
# RDMA off: rbee's RPC runs over loopback only. -Bsymbolic-functions: this machine's compiler
# (/opt/gcc) links libstdc++ statically into every library, and --exclude-libs hides each copy's
# internals, but an inline template such as std::call_once's trampoline is still exported, so
# libggml-rpc's call_once ran libllama's copy of it, which read libllama's empty thread-local
# state: the borrower segfaulted in ggml_backend_rpc_add_server (a native backtrace on the H100,
# 2026-12-07). Binding each library's functions to its own copies keeps each libstdc++ whole.
# A warm machine's build with other flags is built again (its CMakeCache says which it had).
# A build that an earlier call brought back (PACK=1 below) is restored instead: a cold machine
# then starts in seconds, not 260-280 s.
if [[ ! -f "$SITE/llama_cpp/lib/libggml-rpc.so" ]] && compgen -G ".gpu/prebuilt.tar.xz.*" >/dev/null; then
    step "restoring the build carried in .gpu/prebuilt.tar.xz.*"
    cat .gpu/prebuilt.tar.xz.* | tar -xJ -C /
    mkdir -p "$BUILD/bin"
    for lib in "$SITE"/llama_cpp/lib/*.so*; do ln -sf "$lib" "$BUILD/bin/"; done
fi
if [[ ! -f "$SITE/llama_cpp/lib/libggml-rpc.so" ]] \
    || [[ " $TARGETS " == *" llama-server "* && ! -x "$BUILD/bin/llama-server" ]] \
    || ! grep -qx 'GGML_RPC_RDMA:BOOL=OFF' "$BUILD/CMakeCache.txt" \
    || ! grep -qx "GGML_CUDA_FA:BOOL=$CUDA_FA" "$BUILD/CMakeCache.txt" \
    || ! grep -q 'SHARED_LINKER_FLAGS:STRING=.*Bsymbolic-functions' "$BUILD/CMakeCache.txt"; then
    step "building llama.cpp ($TARGETS) for sm_$CUDA_ARCH"
    src="$(mktemp -d)"
    tar -xzf .gpu/llama_cpp_python-*.tar.gz -C "$src" --strip-components=1
    rm -rf "$BUILD"  # its cache names an earlier source folder, which cmake refuses to mix
    cmake -S "$src/vendor/llama.cpp" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$CUDA_ARCH" -DGGML_CUDA_FA="$CUDA_FA" -DGGML_NATIVE=OFF \
        -DBUILD_SHARED_LIBS=ON -DGGML_RPC=ON -DGGML_RPC_RDMA=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DCMAKE_CUDA_RUNTIME_LIBRARY=Shared \
        -DCMAKE_SHARED_LINKER_FLAGS=-Wl,--exclude-libs,ALL,-Bsymbolic-functions >"$OUT/build.log" 2>&1
    # shellcheck disable=SC2086 # TARGETS is a list
    cmake --build "$BUILD" --target $TARGETS >>"$OUT/build.log" 2>&1 \
        || { tail -n 40 "$OUT/build.log"; exit 1; }
    rm -rf "$SITE/llama_cpp"
    cp -r "$src/llama_cpp" "$SITE/llama_cpp"
    mkdir -p "$SITE/llama_cpp/lib"
    find "$BUILD" -name '*.so*' -exec cp -a {} "$SITE/llama_cpp/lib/" \;
    rm -rf "$src"
    step "built: $(ls "$SITE/llama_cpp/lib" | paste -sd' ')"
    if [[ "${PACK:-0}" == 1 ]]; then  # bring the build back, in parts the device tool returns
        server=""
        [[ -x "$BUILD/bin/llama-server" ]] && server="${BUILD#/}/bin/llama-server"
        tar -cf - -C / "${SITE#/}/llama_cpp" "${BUILD#/}/CMakeCache.txt" ${server:+"$server"} \
            | xz -T0 -6 | split -b 15M - "$OUT/prebuilt.tar.xz." \
            && step "packed: $(du -ch "$OUT"/prebuilt.tar.xz.* | tail -n 1)" || step "packing failed"
    fi
fi
"$PY" -c 'import llama_cpp; print("llama_cpp", llama_cpp.__version__, "gpu offload:", llama_cpp.llama_supports_gpu_offload())'

for shape in ${SHAPES:-smollm2 tinyllama}; do
    [[ -f "$MODELS/$shape-shaped.gguf" ]] || "$PY" packaging/cuda/model.py write --shape "$shape" \
        --tokenizer .gpu/tokenizer.json.gz "$MODELS/$shape-shaped.gguf"
done
step "models: $(ls -sh "$MODELS" | tail -n +2 | paste -sd' ')"
export RBEE_MDNS_INTERFACES=127.0.0.1
