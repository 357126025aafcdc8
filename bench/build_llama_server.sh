#!/usr/bin/env bash
# Build llama.cpp's own llama-server and rpc-server, the peers rbee is measured against, from the
# very source llama-cpp-python vendors and with the flags of rbee's engine (packaging/engine.sh,
# recipe "variants", GGML_RPC on), and print llama-server's path on the last line (rpc-server is
# beside it). They are cached in $RBEE_BUILD_CACHE (default ~/.cache/rbee-build).
#
# Only the server and the libraries it links are compiled here; the CPU backend variants it loads
# at run time (from its own directory, as ggml does) are copied out of rbee's wheel, so both sides
# run byte-for-byte the same kernels. Needs cmake (pip's cmake works: `pip install cmake`).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
CACHE_DIR="${RBEE_BUILD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/rbee-build}"
log() { echo "build_llama_server.sh: $*" >&2; }

wheel="$(PYTHON="$PYTHON" "$ROOT/packaging/engine.sh")"
wheel_dir="$(dirname "$wheel")"
flags="$("$ROOT/packaging/engine.sh" --print-cmake-args) -DLLAMA_BUILD_SERVER=ON \
-DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF \
-DLLAMA_OPENSSL=OFF -DCMAKE_BUILD_TYPE=Release -DCMAKE_BUILD_RPATH=\$ORIGIN"
out="$CACHE_DIR/llama-server/$(basename "$wheel_dir")"
server="$out/bin/llama-server"
if [[ ! -x "$server" || ! -x "$out/bin/rpc-server" ]]; then
    sdist="$(find "$CACHE_DIR/sdist" -name 'llama_cpp_python-*.tar.gz' | head -n1)"
    [[ -n "$sdist" ]] || { log "no llama-cpp-python sdist in $CACHE_DIR/sdist"; exit 1; }
    src="$(mktemp -d "$CACHE_DIR/tmp.XXXXXX")"
    trap 'rm -rf "$src"' EXIT
    log "building llama-server from $sdist (several minutes, once)"
    tar -xzf "$sdist" -C "$src" --strip-components=1
    command -v cmake >/dev/null || { log "cmake is missing: pip install cmake"; exit 1; }
    # shellcheck disable=SC2086  # the flags are words
    cmake -S "$src/vendor/llama.cpp" -B "$src/build" -G Ninja $flags >/dev/null
    cmake --build "$src/build" --target llama-server ggml-rpc-server >/dev/null
    mkdir -p "$out/bin"
    cp -a "$src"/build/bin/llama-server "$src"/build/bin/*.so* "$out/bin/"
    cp -a "$src"/build/bin/ggml-rpc-server "$out/bin/rpc-server"  # the name llama.cpp documents
    "$PYTHON" - "$wheel" "$out/bin" <<'EOF'
import sys, zipfile
from pathlib import Path
with zipfile.ZipFile(sys.argv[1]) as wheel:
    for name in wheel.namelist():
        if Path(name).name.startswith("libggml-cpu-") and name.startswith("llama_cpp/lib/"):
            Path(sys.argv[2], Path(name).name).write_bytes(wheel.read(name))
EOF
fi
echo "$server"
