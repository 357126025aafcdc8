#!/usr/bin/env bash
# Build llama-cpp-python (the version rbee pins) as a wheel with one of rbee's CPU recipes, cache
# it, and print the wheel's path on the last line. The development venv (make setup), CI and the
# binary (packaging/build.sh) all install the same wheel: what is tested is what ships.
#
#   packaging/engine.sh                 the recipe rbee uses: "variants"
#   packaging/engine.sh native          -march=native (pip's default; for benchmarks only)
#   packaging/engine.sh v3              portable x86-64-v3 (for benchmarks only)
#   packaging/engine.sh --print-cmake-args [RECIPE]
#
# "variants" is llama.cpp's runtime CPU-variant selection, as its release builds and Ollama ship
# it: GGML_BACKEND_DL + GGML_CPU_ALL_VARIANTS build the CPU backend once per instruction-set
# level (x64, SSE4.2, AVX, AVX2, AVX-512, VNNI, AMX …) as libggml-cpu-NAME.so beside libllama,
# and ggml loads the best one the running CPU supports (rbee/worker/backends.py). One wheel is
# then as fast as a native build on any x86-64 machine and never executes an instruction the
# machine lacks. The variants land in llama_cpp/lib (CMAKE_INSTALL_BINDIR), where
# llama-cpp-python's own libraries are. No shared library re-exports what it took from a static
# archive (-Wl,--exclude-libs,ALL): without it a native build crashed in std::regex while loading
# the vocabulary in a process that had imported pyzmq (packaging/cuda/build.sh).
#
# pip's wheel cache is keyed by the sdist's location, not by CMAKE_ARGS, so each recipe builds
# from an sdist at a path unique to its key; the result is kept in $RBEE_BUILD_CACHE
# (default ~/.cache/rbee-build). Variables: PYTHON (default python3), LLAMA_SDIST (a local sdist
# instead of downloading one), CMAKE_BUILD_PARALLEL_LEVEL (default: every core),
# RBEE_LLAMA_CMAKE_ARGS (other flags altogether: a recipe of their own, e.g. a CUDA build).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
CACHE_DIR="${RBEE_BUILD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/rbee-build}"

COMMON="-DGGML_BLAS=OFF -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_RPC=ON -DLLAVA_BUILD=OFF \
-DCMAKE_SHARED_LINKER_FLAGS=-Wl,--exclude-libs,ALL"

cmake_args() {
    case "$1" in
        variants) echo "-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON \
-DCMAKE_INSTALL_BINDIR=llama_cpp/lib $COMMON" ;;
        native) echo "-DGGML_NATIVE=ON $COMMON" ;;
        v3) echo "-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
-DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AVX_VNNI=OFF $COMMON" ;;
        *) echo "engine.sh: unknown recipe '$1' (variants, native or v3)" >&2; return 2 ;;
    esac
}

if [[ "${1:-}" == "--print-cmake-args" ]]; then
    cmake_args "${2:-variants}"
    exit
fi
RECIPE="${1:-variants}"
ARGS="$(cmake_args "$RECIPE")"
if [[ -n "${RBEE_LLAMA_CMAKE_ARGS:-}" ]]; then  # e.g. the CUDA build's (packaging/cuda/build.sh)
    RECIPE=custom
    ARGS="$RBEE_LLAMA_CMAKE_ARGS"
fi

log() { echo "engine.sh: $*" >&2; }

LLAMA_VERSION="$(sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' "$ROOT/pyproject.toml")"
[[ -n "$LLAMA_VERSION" ]] || { log "no llama-cpp-python==X pin in pyproject.toml"; exit 1; }
py_tag="$("$PYTHON" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
# The key names the exact build: a change of flags, version, interpreter or machine kind is a
# new wheel. A native build is also tied to the CPU it was built on.
native_cpu=""
[[ "$RECIPE" == native ]] && native_cpu="$(grep -m1 '^flags' /proc/cpuinfo)"
key="$(printf '%s\n' "$LLAMA_VERSION" "$ARGS" "$py_tag" "$(uname -m)" "$native_cpu" \
    | sha256sum | cut -c1-12)"
wheel_dir="$CACHE_DIR/wheels/llama-cpp-python-$LLAMA_VERSION-$RECIPE-$key"

find_wheel() { find "$wheel_dir" -maxdepth 1 -name 'llama_cpp_python-*.whl' 2>/dev/null | head -n1 || true; }
wheel="$(find_wheel)"
if [[ -z "$wheel" ]]; then
    log "building llama-cpp-python $LLAMA_VERSION, recipe $RECIPE (several minutes, once)"
    log "CMAKE_ARGS=$ARGS"
    sdist_dir="$CACHE_DIR/sdist/$key"
    mkdir -p "$sdist_dir" "$wheel_dir"
    sdist="$sdist_dir/llama_cpp_python-$LLAMA_VERSION.tar.gz"
    if [[ ! -f "$sdist" ]]; then
        if [[ -n "${LLAMA_SDIST:-}" ]]; then
            cp "$LLAMA_SDIST" "$sdist"
        else
            "$PYTHON" -m pip download --quiet --no-deps --no-binary llama-cpp-python \
                "llama-cpp-python==$LLAMA_VERSION" -d "$sdist_dir"
        fi
    fi
    tmp_wheels="$(mktemp -d "$CACHE_DIR/tmp.XXXXXX")"
    trap 'rm -rf "$tmp_wheels"' EXIT
    CMAKE_ARGS="$ARGS" FORCE_CMAKE=1 \
        CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
        "$PYTHON" -m pip wheel --quiet --no-deps "$sdist" -w "$tmp_wheels"
    mv "$tmp_wheels"/llama_cpp_python-*.whl "$wheel_dir/"
    printf '%s\n' "$ARGS" >"$wheel_dir/CMAKE_ARGS"
    wheel="$(find_wheel)"
fi
echo "$wheel"
