#!/usr/bin/env bash
# Build the rbee binary with PyInstaller: the one command, from a clean clone.
#
#   packaging/build.sh              one-dir bundle  -> dist/rbee/rbee  (the default: starts fast,
#                                   and a hive re-executes it for every worker)
#   RBEE_ONEFILE=1 packaging/build.sh   one-file     -> dist/rbee-onefile
#
# Steps, each skipped when its result is already there (so a second run takes seconds):
#   1. a portable llama-cpp-python wheel (x86-64-v3: AVX2/FMA/F16C/BMI2, not -march=native),
#      built once from the sdist and kept in $RBEE_BUILD_CACHE (default ~/.cache/rbee-build);
#   2. a separate build venv (build/venv) holding that wheel, rbee (not editable) and PyInstaller;
#   3. PyInstaller with rbee.spec, rerun only when its inputs changed (rbee's sources, the spec,
#      the units, this script, the build venv's packages).
# The last line printed is the binary's path.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
BUILD_DIR="${RBEE_BUILD_DIR:-$ROOT/build}"
CACHE_DIR="${RBEE_BUILD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/rbee-build}"
VENV="$BUILD_DIR/venv"
DIST_DIR="${RBEE_DIST_DIR:-$ROOT/dist}"
ONEFILE="${RBEE_ONEFILE:-0}"
PYINSTALLER_SPEC="${PYINSTALLER_SPEC:-pyinstaller==6.*}"

LLAMA_VERSION="$(sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' "$ROOT/pyproject.toml")"
[[ -n "$LLAMA_VERSION" ]] || { echo "build.sh: no llama-cpp-python==X pin in pyproject.toml" >&2; exit 1; }

# Not tuned to the build machine: x86-64-v3 (Intel Haswell 2013+, AMD Zen/Excavator 2015+).
# llama.cpp's runtime CPU-variant selection (GGML_BACKEND_DL + GGML_CPU_ALL_VARIANTS) is not
# used because llama-cpp-python never calls ggml_backend_load_all(). Override to go lower,
# e.g. RBEE_LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=OFF -DGGML_FMA=OFF -DGGML_F16C=OFF
# -DGGML_BMI2=OFF" for SSE4.2/AVX-only machines (much slower matrix code).
CMAKE_ARGS_PORTABLE="${RBEE_LLAMA_CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON \
-DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AVX_VNNI=OFF \
-DGGML_BLAS=OFF -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DLLAVA_BUILD=OFF}"

log() { echo "build.sh: $*" >&2; }

py_tag="$("$PYTHON" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
if [[ "$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_config_var("Py_ENABLE_SHARED"))')" != 1 ]]; then
    log "$PYTHON has no shared libpython, which PyInstaller needs (pyenv: PYTHON_CONFIGURE_OPTS=--enable-shared)"
    exit 1
fi
# The key names the exact build: a change of flags, version or interpreter is a new wheel.
key="$(printf '%s\n' "$LLAMA_VERSION" "$CMAKE_ARGS_PORTABLE" "$py_tag" "$(uname -m)" \
    | sha256sum | cut -c1-12)"
wheel_dir="$CACHE_DIR/wheels/llama-cpp-python-$LLAMA_VERSION-$key"

# --- 1. the portable llama-cpp-python wheel ------------------------------------------------
find_wheel() { find "$wheel_dir" -maxdepth 1 -name 'llama_cpp_python-*.whl' 2>/dev/null | head -n1 || true; }
wheel="$(find_wheel)"
if [[ -z "$wheel" ]]; then
    log "building a portable llama-cpp-python $LLAMA_VERSION wheel (several minutes, once)"
    log "CMAKE_ARGS=$CMAKE_ARGS_PORTABLE"
    # pip's wheel cache is keyed by where the sdist came from, not by CMAKE_ARGS, and it already
    # holds a -march=native wheel for the PyPI sdist. Building from an sdist at a path unique to
    # this key gives pip a cache key of its own, without giving up pip's cache.
    sdist_dir="$CACHE_DIR/sdist/$key"
    mkdir -p "$sdist_dir" "$wheel_dir"
    sdist="$sdist_dir/llama_cpp_python-$LLAMA_VERSION.tar.gz"
    if [[ ! -f "$sdist" ]]; then
        "$PYTHON" -m pip download --quiet --no-deps --no-binary llama-cpp-python \
            "llama-cpp-python==$LLAMA_VERSION" -d "$sdist_dir"
    fi
    tmp_wheels="$(mktemp -d "$CACHE_DIR/tmp.XXXXXX")"
    trap 'rm -rf "$tmp_wheels"' EXIT
    CMAKE_ARGS="$CMAKE_ARGS_PORTABLE" FORCE_CMAKE=1 \
        CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
        "$PYTHON" -m pip wheel --no-deps "$sdist" -w "$tmp_wheels"
    mv "$tmp_wheels"/llama_cpp_python-*.whl "$wheel_dir/"
    printf '%s\n' "$CMAKE_ARGS_PORTABLE" >"$wheel_dir/CMAKE_ARGS"
    wheel="$(find_wheel)"
fi
log "llama-cpp-python wheel: $wheel"

# --- 2. the build venv ---------------------------------------------------------------------
if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating $VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
want_llama="$(basename "$wheel")|$key"
if [[ "$(cat "$VENV/.rbee-llama" 2>/dev/null)" != "$want_llama" ]]; then
    log "installing $(basename "$wheel") and PyInstaller into $VENV"
    "$VENV/bin/python" -m pip install --quiet --force-reinstall "$wheel"
    "$VENV/bin/python" -m pip install --quiet "$PYINSTALLER_SPEC" pyinstaller-hooks-contrib
    printf '%s\n' "$want_llama" >"$VENV/.rbee-llama"
fi

# --- 3. rbee itself, then PyInstaller ------------------------------------------------------
# Everything that changes the bundle: rbee's sources (tracked or not), its metadata, the spec,
# the units, and the build venv's packages (a dependency added or upgraded there).
sources_hash() {
    (cd "$ROOT" && {
        find rbee -name '*.py' -o -name '*.typed' | LC_ALL=C sort
        echo pyproject.toml rbee.spec packaging/build.sh packaging/entry.py systemd/*
    } | xargs sha256sum | sha256sum | cut -c1-16)
}
venv_hash() {
    "$VENV/bin/python" -m pip freeze --quiet --exclude rbee 2>/dev/null | sha256sum | cut -c1-16
}
sources="$(sources_hash)"
if [[ "$ONEFILE" == 1 ]]; then
    binary="$DIST_DIR/rbee-onefile"
else
    binary="$DIST_DIR/rbee/rbee"
fi
stamp="$BUILD_DIR/stamps/$(basename "$binary").stamp"  # outside dist: installs copy dist/rbee
mkdir -p "$BUILD_DIR/stamps"
if [[ -x "$binary" && "$(cat "$stamp" 2>/dev/null)" == "$sources|$(venv_hash)|$key" ]]; then
    log "up to date (sources $sources)"
else
    log "inputs changed since the last build (sources $sources)"
    log "installing rbee (not editable) into $VENV"
    # rbee's own dependencies are resolved here; llama-cpp-python is already the portable one.
    "$VENV/bin/python" -m pip install --quiet "$ROOT"
    # --no-deps: a forced reinstall of the dependencies would swap the portable llama-cpp-python
    # for whatever pip's cache holds for the PyPI sdist (a -march=native build).
    "$VENV/bin/python" -m pip install --quiet --force-reinstall --no-deps "$ROOT"
    grep -q "$wheel_dir" "$VENV"/lib/python*/site-packages/llama_cpp_python-*.dist-info/direct_url.json \
        || { log "llama-cpp-python in $VENV is not the portable wheel"; exit 1; }
    log "running PyInstaller (onefile=$ONEFILE)"
    # Run outside the source tree so PyInstaller analyses the installed rbee, not ./rbee.
    (cd "$BUILD_DIR" && RBEE_ONEFILE="$ONEFILE" "$VENV/bin/python" -m PyInstaller \
        --noconfirm --log-level WARN --distpath "$DIST_DIR" --workpath "$BUILD_DIR/pyinstaller" \
        "$ROOT/rbee.spec")
    # The venv is hashed after installing rbee, which may have added dependencies to it.
    printf '%s\n' "$sources|$(venv_hash)|$key" >"$stamp"
fi
"$binary" --version >&2
echo "$binary"
