"""19: GPUs by default, on a machine with an NVIDIA GPU and rbee's CUDA engine.

Three checks and one measurement, all with no ``--backend`` anywhere:

1. `rbee infer` (hive and keeper with default settings, the hive pinned with ``--node``) runs its
   worker on the GPU: `rbee ps` shows ``cuda:0 N/N``.
2. `rbee serve` (no ``--backend``; its worker stopped first, so the gateway's request spawns a new
   one) runs on the GPU too.
3. With most of the GPU's memory held by another process (``hog``: cudaMalloc through the CUDA
   runtime, leaving free the margin, the compute buffer and runtime, and about half the model's
   layers), `rbee explain` shows a partial offload chosen and why the whole-GPU option lost,
   and the worker runs ``cpu+cuda:0 a+b/N``.
4. Under that same memory, one stream of ``--tokens`` through `rbee serve` against llama-server
   from the same CUDA build (``-c`` the same context, ``--parallel 1``, ``--fit on``: its default,
   which picks the GPU layers itself with a 1 GiB margin, as rbee's placement does):
   tokens/s rbee ÷ llama-server, target ≥ 0.9, and how many layers each put on the GPU.

Steps 1 and 2 load the model whole on the GPU twice, so the hive's ledger has measured what
the file really takes (rbee.hive.ledger) before it plans the partial offload. The hive runs
``--parallel 1`` so that both sides hold one sequence's KV cache. Each side loads
the model once and streams ``--reps`` times after a warm-up; llama-server first, then rbee, the
hog holding its memory throughout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from batching import RESULTS, prompts, slot_context, streams
from common import (
    RBEE,
    Row,
    free_port,
    machine,
    markdown,
    median,
    running_hive,
    serving,
    stop,
    table,
)

from rbee.hive import fit
from rbee.hive.placement import estimate_for_file

MIB = 1 << 20


def rbee(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run `rbee ARGS`; fail the benchmark with its output if it fails."""
    done = subprocess.run(
        [*RBEE, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode:
        raise SystemExit(f"rbee {' '.join(args)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return done


def where_column(ps_text: str) -> list[str]:
    """The WHERE cells of `rbee ps` (one per worker)."""
    lines = ps_text.strip().splitlines()
    head = lines[0]
    start = head.index("WHERE")
    end = head.index("PID")
    return [line[start:end].strip() for line in lines[1:]]


def stop_workers(node: str, env: dict[str, str]) -> None:
    """Stop every worker of the hive and wait until they are gone (their memory freed)."""
    listed = rbee("ps", "--node", node, env=env).stdout
    for line in listed.strip().splitlines()[1:]:
        worker = line.split()[1]
        rbee("workers", "stop", worker, "--node", node, env=env)
    deadline = time.monotonic() + 60
    while "no workers" not in rbee("ps", "--node", node, env=env).stdout:
        if time.monotonic() > deadline:
            raise SystemExit(f"the workers of {node} did not stop")
        time.sleep(0.5)


@contextmanager
def hog(leave_bytes: int) -> Iterator[int]:
    """Hold all but ``leave_bytes`` of GPU 0's free memory in another process; yields the bytes
    held. The process allocates with cudaMalloc and sleeps until it is killed."""
    script = f"""
import ctypes, sys, time
cuda = ctypes.CDLL("libcudart.so")
free, total = ctypes.c_size_t(), ctypes.c_size_t()
assert cuda.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total)) == 0
want = max(0, free.value - {leave_bytes})
ptr = ctypes.c_void_p()
assert cuda.cudaMalloc(ctypes.byref(ptr), ctypes.c_size_t(want)) == 0, "cudaMalloc failed"
print(want, flush=True)
time.sleep(3600)
"""
    env = {**os.environ}
    env["LD_LIBRARY_PATH"] = ":".join(
        p for p in ("/usr/local/cuda/lib64", env.get("LD_LIBRARY_PATH", "")) if p
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        held = int(proc.stdout.readline() or "0")
        if not held:
            raise SystemExit(f"the memory hog did not start (exit {proc.poll()})")
        yield held
    finally:
        stop(proc)  # type: ignore[arg-type]


def gpu_free_bytes() -> int:
    """GPU 0's free memory now (NVML)."""
    import pynvml  # type: ignore[import-not-found,import-untyped,unused-ignore]

    pynvml.nvmlInit()
    return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).free)


def rates(base: str, model: str, tag: str, tokens: int, reps: int) -> list[float]:
    """A warm-up, then ``reps`` single streams: tokens/s of each."""
    streams(base, model, prompts(1, f"{tag}w"), 16, 600)
    return [
        streams(base, model, prompts(1, f"{tag}{r}"), tokens, 600)[0].tokens_per_s
        for r in range(reps)
    ]


def run(model: str, llama_server: str, tokens: int, reps: int) -> tuple[list[Row], dict[str, Any]]:
    rbee_model = f"file:{Path(model).resolve()}"
    ctx = slot_context(model)  # a worker's context, as the hive sets it
    about: dict[str, Any] = {"model": model, "ctx": ctx}
    with tempfile.TemporaryDirectory() as tmp, running_hive(tmp, "--parallel", "1") as hive:
        env = hive.env
        node = f"127.0.0.1:{env['RBEE_HIVE_PORT']}"
        # 1. rbee infer, no --backend
        rbee(
            "infer", "-m", rbee_model, "--node", node, "-n", "16", "-t", "0", "--raw", "Hi", env=env
        )
        ps = rbee("ps", "--node", node, env=env).stdout
        about["infer_ps"] = ps
        infer_where = where_column(ps)
        print(f"[infer] no --backend: {infer_where}", flush=True)
        # 2. rbee serve, no --backend, a fresh worker
        stop_workers(node, env)
        port = free_port()
        gateway_argv = [*RBEE, "serve", "--listen", f"127.0.0.1:{port}", "--node", node]
        with serving(gateway_argv, env, port, "/health") as gateway:
            streams(gateway.base, rbee_model, prompts(1, "s"), 16, 600)
            serve_where = where_column(rbee("ps", "--node", node, env=env).stdout)
            print(f"[serve] no --backend: {serve_where}", flush=True)
            stop_workers(node, env)
            # 3. and 4. under memory held by another process
            need = estimate_for_file(model, ctx, "cuda", 1)
            half = (need.n_layers // 2) * fit.layer_bytes(need)
            leave = fit.GPU_MARGIN_BYTES + fit.gpu_fixed_bytes(need) + half
            about["estimate"] = need.describe()
            with hog(leave) as held:
                free = gpu_free_bytes()
                about["hog_bytes"], about["free_bytes"] = held, free
                print(f"[hog] holds {held // MIB:,} MiB; {free // MIB:,} MiB free", flush=True)
                explained = rbee("explain", rbee_model, "--node", node, env=env).stdout
                about["explain"] = explained
                print(explained, flush=True)
                peer_port = free_port()
                peer_argv = [llama_server, "-m", model, "-c", str(ctx), "--parallel", "1"]
                peer_argv += ["--fit", "on", "--host", "127.0.0.1", "--port", str(peer_port)]
                with serving(peer_argv, None, peer_port, "/v1/models") as peer:
                    peer_rates = rates(peer.base, "peer", "p", tokens, reps)
                rbee_rates = rates(gateway.base, rbee_model, "r", tokens, reps)
                about["hive_log"] = [
                    x
                    for x in hive.log.read_text(errors="replace").splitlines()
                    if "gpu memory measured" in x or "worker ready" in x
                ]
                partial_where = where_column(rbee("ps", "--node", node, env=env).stdout)
                print(f"[partial] {partial_where}", flush=True)
    about.update(infer_where=infer_where, serve_where=serve_where, partial_where=partial_where)
    about.update(peer_rates=peer_rates, rbee_rates=rbee_rates)
    ratios = [r / p for r, p in zip(rbee_rates, peer_rates, strict=True)]
    rows = [
        Row(
            "19",
            "partial offload: tokens/s, rbee ÷ llama-server --fit on",
            ratios,
            rbee=rbee_rates,
            baseline=peer_rates,
            op="≥",
            target=0.9,
            digits=3,
            note=f"rbee {partial_where[0] if partial_where else '?'}; {about['estimate']}",
        )
    ]
    return rows, about


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a GGUF file larger than a few layers")
    parser.add_argument("--llama-server", required=True, help="llama-server of the same build")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", type=Path, help="default: bench/results/placement-<time>.json")
    args = parser.parse_args()
    os.environ.setdefault("RBEE_MDNS_INTERFACES", "127.0.0.1")
    about = machine()
    print("machine: " + "; ".join(f"{k} {v}" for k, v in about.items()), flush=True)
    rows, details = run(args.model, args.llama_server, args.tokens, args.reps)

    def first(key: str) -> str:
        return str(details[key][0]) if details[key] else ""

    checks = {
        "infer on the GPU": first("infer_where").startswith("cuda:0"),
        "serve on the GPU": first("serve_where").startswith("cuda:0"),
        "partial offload chosen": first("partial_where").startswith("cpu+cuda:0"),
        "explain shows it": "yes partial" in details["explain"],
    }
    print(table(rows))
    for name, ok in checks.items():
        print(f"{name}: {'yes' if ok else 'NO'}")
    path = args.json or RESULTS / f"placement-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": about,
        "rows": [r.to_json() for r in rows],
        "markdown": markdown(rows),
        "checks": checks,
        "median_ratio": median(rows[0].figure),
        **details,
    }
    path.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print(f"results: {path}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
