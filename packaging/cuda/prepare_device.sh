#!/usr/bin/env bash
# Prepare, on a machine with network, everything packaging/cuda/prove_h100.sh needs on a GPU
# machine that has none (Python 3.12, CUDA, cmake, numpy): about 25 MB, in two git-ignored
# folders that the device tool carries (`carry: [".whl", ".gpu"]`).
#
#   .whl/  cp312 manylinux wheels: rbee's hive/worker/keeper/gateway dependencies, httpx (the
#          benchmarks' client), nvidia-ml-py, gguf and pyyaml (to write models there),
#          scikit-build-core and pathspec (to build there), PyInstaller (the CUDA binary)
#   .gpu/  the llama-cpp-python sdist, slimmed from 76 to 12 MB; the default model's tokenizer
#          (0.4 MB: the model itself, 98 MB, is over what a call may carry)
#
# Run from the repository root with the development venv set up (`make` has done it).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PY=.venv/bin/python
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >>.git/info/exclude
mkdir -p .whl .gpu

# Versions as in the development venv, so what runs there is what was tested here.
pin() { "$PY" -c "import importlib.metadata as m; print('$1==' + m.version('$1'))"; }
wanted=(
    "$(pin pyzmq)" "$(pin msgpack)" "$(pin structlog)" "$(pin psutil)" "$(pin zeroconf)"
    "$(pin sqlite-utils)" "$(pin huggingface_hub)" "$(pin httpx2)" "$(pin jinja2)"
    "$(pin diskcache)" "$(pin pyyaml)" "$(pin typing_extensions)"
    "$(pin httpcore2)" "$(pin truststore)" "$(pin anyio)" "$(pin idna)" "$(pin sniffio)"
    "$(pin starlette)" "$(pin uvicorn)" "$(pin h11)" "$(pin click)"
    "$(pin httpx)" "$(pin httpcore)" "$(pin certifi)"
    nvidia-ml-py gguf scikit-build-core pathspec
    "pyinstaller==6.*" pyinstaller-hooks-contrib altgraph packaging
)
python3 -m pip download --quiet --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl "${wanted[@]}"
# Already on the GPU machine, or not imported by the hive, worker or keeper:
rm -f .whl/numpy-*.whl .whl/cryptography-*.whl .whl/cffi-*.whl .whl/pycparser-*.whl \
    .whl/pip-*.whl .whl/spake2-*.whl

version="$(sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' pyproject.toml)"
if [[ ! -f ".gpu/llama_cpp_python-$version.tar.gz" ]]; then
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    python3 -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$tmp"
    tar -C "$tmp" -xzf "$tmp/llama_cpp_python-$version.tar.gz"
    src="$tmp/llama_cpp_python-$version"
    rm -rf "$src"/vendor/llama.cpp/{models,docs,tests,benches,.git} "$src"/{examples,docker,.git}
    tar -C "$tmp" -czf ".gpu/llama_cpp_python-$version.tar.gz" "llama_cpp_python-$version"
fi

model="$("$PY" -c 'from rbee.catalog import default_model_file; print(default_model_file())')"
gguf_site="$(mktemp -d)"
"$PY" -m pip install --quiet --no-deps --target "$gguf_site" .whl/gguf-*.whl
PYTHONPATH="$gguf_site" "$PY" packaging/cuda/model.py tokenizer "$model" .gpu/tokenizer.json.gz
rm -rf "$gguf_site"
du -sh .whl .gpu
