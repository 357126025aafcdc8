#!/usr/bin/env bash
# Issue 19's GPU proof on a machine without network: rbee places models on the GPU with no
# --backend anywhere, offloads part of a model when another process holds most of the GPU's
# memory (against llama-server's --fit on, the same CUDA build), and the PyInstaller binary
# built with the CUDA engine serves a GPU worker.
#
# packaging/cuda/setup.sh installs the carried wheels, builds the engine and llama-server (about
# 260 s on 16 cores) and writes the random-weight models; then bench/placement.py on the
# TinyLlama-shaped F16 model (2.2 GB), then the binary. Results go to $OUT: placement.json,
# binary.txt, report.txt.
#
#   OUT=/tmp/out packaging/cuda/placement.sh    # STAGE=bench or STAGE=binary: only that part
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT="${OUT:-/tmp/placement-out}"
source packaging/cuda/setup.sh
export LD_LIBRARY_PATH="/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
MODEL="$MODELS/${SHAPE:-tinyllama}-shaped.gguf"

if [[ "${STAGE:-all}" != binary ]]; then
    step "benchmark: placement of $(basename "$MODEL")"
    PYTHONUNBUFFERED=1 "$PY" bench/placement.py --llama-server "$BUILD/bin/llama-server" \
        --model "$MODEL" --reps "${REPS:-3}" --tokens "${TOKENS:-256}" \
        --json "$OUT/placement.json" || echo "placement: a check failed (above)"
fi

if [[ "${STAGE:-all}" != bench ]]; then
    step "the rbee binary with the CUDA engine (PyInstaller)"
    # A clean environment: the machine's Python may carry torch, transformers and setuptools,
    # which the analysis would follow (and setuptools' distutils clashes with rbee.spec's
    # exclusion on Python 3.12). numpy, which llama_cpp needs, is copied from it.
    base="$("$PY" -c 'import sys; print(sys.base_prefix)')/bin/python3"
    [[ -x /tmp/rbee-binvenv/bin/python ]] || "$base" -m venv --without-pip /tmp/rbee-binvenv
    numpy_dir="$(PYTHONPATH= "$PY" -c 'import numpy, os; print(os.path.dirname(os.path.dirname(numpy.__file__)))')"
    if [[ ! -d "$SITE"/numpy ]] || ! ls -d "$SITE"/numpy-*.dist-info >/dev/null 2>&1; then
        rm -rf "$SITE"/numpy
        cp -r "$numpy_dir"/numpy "$numpy_dir"/numpy-*.dist-info "$SITE"/
        [[ ! -d "$numpy_dir"/numpy.libs ]] || cp -r "$numpy_dir"/numpy.libs "$SITE"/
    fi
    rm -rf "$SITE"/setuptools "$SITE"/_distutils_hack "$SITE"/pkg_resources
    /tmp/rbee-binvenv/bin/python -m PyInstaller --noconfirm --log-level WARN --distpath /tmp/rbee-dist \
        --workpath /tmp/rbee-pyi rbee.spec >"$OUT/pyinstaller.log" 2>&1 \
        || { tail -n 30 "$OUT/pyinstaller.log"; exit 1; }
    bin=/tmp/rbee-dist/rbee/rbee
    data="$(mktemp -d)"
    export RBEE_DATA_DIR="$data" RBEE_HIVE_PORT=17930 RBEE_STREAM_PORT=17931 RBEE_CLUSTER=binary
    "$bin" --version
    "$bin" hive 2>"$data/hive.log" &
    hive=$!
    trap 'kill $hive 2>/dev/null; wait $hive 2>/dev/null' EXIT
    for _ in $(seq 100); do grep -q '"hive ready"' "$data/hive.log" && break; sleep 0.1; done
    node=127.0.0.1:17930
    "$bin" infer -m "file:$MODEL" --node "$node" -n 32 --raw "The binary says" | tee "$OUT/binary.txt"
    "$bin" ps --node "$node" | tee -a "$OUT/binary.txt"
    "$bin" explain "file:$MODEL" --node "$node" | tee -a "$OUT/binary.txt"
    if grep -q " cuda:0 " "$OUT/binary.txt"; then
        step "binary: serves a GPU worker"
    else
        step "binary: NO GPU worker"
        exit 1
    fi
fi
step "done"
