#!/usr/bin/env bash
# Build the rbee binary with PyInstaller: the one command, from a clean clone.
#
#   packaging/build.sh              one-dir bundle  -> dist/rbee/rbee  (the default: starts fast,
#                                   and a hive re-executes it for every worker)
#   RBEE_ONEFILE=1 packaging/build.sh   one-file     -> dist/rbee-onefile
#
# Steps, each skipped when its result is already there (so a second run takes seconds):
#   1. the llama-cpp-python wheel of packaging/engine.sh (every CPU variant, the best one chosen
#      at run time), built once and kept in $RBEE_BUILD_CACHE (default ~/.cache/rbee-build);
#   2. a separate build venv (build/venv) holding that wheel, rbee (not editable) and PyInstaller;
#   3. PyInstaller with rbee.spec, rerun only when its inputs changed (rbee's sources, the spec,
#      the units, this script, the build venv's packages).
# The last line printed is the binary's path.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
BUILD_DIR="${RBEE_BUILD_DIR:-$ROOT/build}"
VENV="$BUILD_DIR/venv"
DIST_DIR="${RBEE_DIST_DIR:-$ROOT/dist}"
ONEFILE="${RBEE_ONEFILE:-0}"
PYINSTALLER_SPEC="${PYINSTALLER_SPEC:-pyinstaller==6.*}"

log() { echo "build.sh: $*" >&2; }

if [[ "$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_config_var("Py_ENABLE_SHARED"))')" != 1 ]]; then
    log "$PYTHON has no shared libpython, which PyInstaller needs (pyenv: PYTHON_CONFIGURE_OPTS=--enable-shared)"
    exit 1
fi

# --- 1. the llama-cpp-python wheel: the one the development venv and CI run (engine.sh) ------
wheel="$(PYTHON="$PYTHON" "$ROOT/packaging/engine.sh")"
key="$(basename "$(dirname "$wheel")")"
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
        echo pyproject.toml rbee.spec packaging/build.sh packaging/engine.sh packaging/entry.py systemd/*
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
    grep -q "$(dirname "$wheel")" "$VENV"/lib/python*/site-packages/llama_cpp_python-*.dist-info/direct_url.json \
        || { log "llama-cpp-python in $VENV is not the wheel of packaging/engine.sh"; exit 1; }
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
