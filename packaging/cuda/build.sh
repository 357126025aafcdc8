#!/usr/bin/env bash
# Build the CUDA variant of llama-cpp-python (the version rbee pins) as a wheel, for the GPU
# architectures you name, and print the wheel's path on the last line.
#
#   packaging/cuda/build.sh                      # for CUDA_ARCH=90 (H100, H200)
#   CUDA_ARCH=89 packaging/cuda/build.sh         # L4, RTX 40xx; 80: A100; 86: A10, RTX 30xx;
#   CUDA_ARCH="80;86;89;90" packaging/cuda/build.sh   #  several (a longer build, a larger wheel)
#   pip install --force-reinstall --no-deps "$(packaging/cuda/build.sh | tail -n1)"
#   packaging/cuda/build.sh --print-cmake-args   # only the CMake flags (see the binary below)
#
# Needs the CUDA toolkit (nvcc), cmake and a C++ compiler; the NVIDIA driver is needed only to
# run, not to build. Building for one architecture keeps it short: about 265 s on 16 cores for
# sm_90, and a 269 MB wheel (shared/GPU.md). Variables:
#   CUDA_ARCH      CMAKE_CUDA_ARCHITECTURES (default 90)
#   LLAMA_SDIST    a local sdist instead of downloading one (a machine without network; a
#                  slimmed sdist works: vendor/llama.cpp/{models,docs,tests,benches}, examples/,
#                  docker/ and .git are not needed)
#   NO_BUILD_ISOLATION=1  build with the scikit-build-core already installed (offline machines:
#                  install the wheels of scikit-build-core, pathspec and packaging first)
#   WHEEL_DIR      where the wheel goes (default build/cuda-wheels); PYTHON (default python3)
#
# The CPU part of this build is portable x86-64-v3 (AVX2/FMA/F16C), as in packaging/build.sh,
# so a CPU worker of a CUDA hive is as fast as one of the CPU build.
#
# The CUDA runtime is linked as a shared library (CMake links the static one into every target
# with CUDA code by default) and no shared library re-exports what it took from a static archive
# (-Wl,--exclude-libs,ALL). Built without these two flags, a process that had imported pyzmq
# before loading a model (every rbee worker) died with SIGSEGV inside std::regex while llama.cpp
# loaded the vocabulary, called into code in libggml-cuda.so; llama-cpp-python alone loaded fine.
# With them it loads (seen on an H100, GPU_RESULTS.md; which of the two matters was not isolated).
# packaging/cuda/loadcheck.py checks exactly this. Each library also binds its functions to its
# own copies (-Bsymbolic-functions): where the compiler links libstdc++ statically into every
# library (the GPU machine's /opt/gcc does), an exported inline template such as std::call_once's
# trampoline otherwise runs one library's copy against another's thread-local state, which made
# a borrower of lent memory (GGML_RPC, on here as in the CPU engine) segfault in
# ggml_backend_rpc_add_server (packaging/cuda/setup.sh).
#
# The rbee binary with CUDA: packaging/build.sh takes its llama.cpp flags from
# RBEE_LLAMA_CMAKE_ARGS and keys its cached wheel by them, so
#   RBEE_LLAMA_CMAKE_ARGS="$(packaging/cuda/build.sh --print-cmake-args)" packaging/build.sh
# builds a CUDA bundle. PyInstaller then bundles libcudart and libcublas/libcublasLt from the
# toolkit next to libggml-cuda (several hundred MB); libcuda.so.1 is the driver's and must come
# from the machine that runs it (the bundle must not carry it). Not yet built or tested here.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-python3}"
CUDA_ARCH="${CUDA_ARCH:-90}"
WHEEL_DIR="${WHEEL_DIR:-$ROOT/build/cuda-wheels}"
CMAKE_ARGS_CUDA="-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCH -DGGML_NATIVE=OFF \
-DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF \
-DGGML_BLAS=OFF -DGGML_VULKAN=OFF -DGGML_RPC=ON -DLLAVA_BUILD=OFF -DCMAKE_CUDA_RUNTIME_LIBRARY=Shared \
-DCMAKE_SHARED_LINKER_FLAGS=-Wl,--exclude-libs,ALL,-Bsymbolic-functions"

if [[ "${1:-}" == "--print-cmake-args" ]]; then
    echo "$CMAKE_ARGS_CUDA"
    exit 0
fi

log() { echo "cuda/build.sh: $*" >&2; }

LLAMA_VERSION="$(sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' "$ROOT/pyproject.toml")"
[[ -n "$LLAMA_VERSION" ]] || { log "no llama-cpp-python==X pin in pyproject.toml"; exit 1; }
command -v nvcc >/dev/null || [[ -x /usr/local/cuda/bin/nvcc ]] \
    || { log "nvcc not found: install the CUDA toolkit (or add /usr/local/cuda/bin to PATH)"; exit 1; }
export PATH="$PATH:/usr/local/cuda/bin"
export CUDACXX="${CUDACXX:-$(command -v nvcc)}"

sdist="${LLAMA_SDIST:-}"
if [[ -z "$sdist" ]]; then
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    "$PYTHON" -m pip download --quiet --no-deps --no-binary llama-cpp-python \
        "llama-cpp-python==$LLAMA_VERSION" -d "$tmp"
    sdist="$(ls "$tmp"/llama_cpp_python-*.tar.gz)"
fi
log "llama-cpp-python $LLAMA_VERSION from $sdist, CUDA architectures $CUDA_ARCH ($(nvcc --version | tail -n1))"
log "CMAKE_ARGS=$CMAKE_ARGS_CUDA"

isolation=()
[[ "${NO_BUILD_ISOLATION:-0}" == 1 ]] && isolation=(--no-build-isolation)
mkdir -p "$WHEEL_DIR"
started=$SECONDS
CMAKE_ARGS="$CMAKE_ARGS_CUDA" FORCE_CMAKE=1 \
    CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
    "$PYTHON" -m pip wheel --no-deps "${isolation[@]}" "$sdist" -w "$WHEEL_DIR" >&2
wheel="$(ls -t "$WHEEL_DIR"/llama_cpp_python-"$LLAMA_VERSION"-*.whl | head -n1)"
log "built in $((SECONDS - started)) s: $(du -h "$wheel" | cut -f1)"
echo "$wheel"
