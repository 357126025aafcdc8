"""Issue 20 on a GPU machine: a model's layers in memory that a GPU lends.

One process that sees no GPU (CUDA_VISIBLE_DEVICES="") holds the model and puts its last
``--lent`` layers on a lender, llama.cpp's RPC server under rbee (`rbee lender --device CUDA0`)
on a loopback port; then the same through a lending hive, which must choose its GPU by itself
(rbee.hive.lendable) and is reached through a Tunnel as a borrowing hive reaches it. The greedy
text of each is compared with the model run whole on the CPU, whole on the GPU, and split CPU +
local GPU (the same layers on the same CUDA kernels: the exact comparison for the lent run, where
CPU and GPU arithmetic may differ after many tokens of random weights). The lender's VRAM is
read from nvidia-smi while it holds the layers.

    python packaging/cuda/lend_gpu.py --model M.gguf --lent 12 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

READY_S = 60.0
RUN_S = 600.0

# One greedy job through the worker's own engine and slots; prints what it wrote, how fast.
CHILD = """
import json, sys, time
from rbee.protocol.messages import Done, GenerateParams, RunJob, Token
from rbee.worker.engine import Engine
from rbee.worker.slots import run_alone

model, backend, rpc, layers, tokens = sys.argv[1:6]
t0 = time.monotonic()
engine = Engine(model, 1024, lambda _: None, backend=backend, rpc=[rpc] if rpc else [],
                gpu_layers=int(layers), threads=int(sys.argv[6]))
load_s = time.monotonic() - t0
print("loaded", flush=True)
params = GenerateParams(prompt="The capital of France is", max_tokens=int(tokens),
                        temperature=0.0, raw=True, ignore_eos=True)
frames = run_alone(engine, RunJob(job_id="j-lend", params=params))
done = frames[-1]
assert isinstance(done, Done), done
text = "".join(f.text for f in frames if isinstance(f, Token)) + done.tail
print(json.dumps({"text": text, "offloaded": engine.gpu_layers, "layers": engine.n_layers,
                  "load_s": round(load_s, 2), "tokens": done.tokens, "ttft_s": done.ttft_s,
                  "tok_s": round(max(done.tokens - 1, 1) / max(done.decode_s, 1e-9), 1)}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def vram_of(pids: set[int]) -> int:
    """MiB that nvidia-smi says ``pids`` hold now."""
    out = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    used = 0
    for line in out.splitlines():
        pid, _, mib = line.partition(",")
        if pid.strip().isdigit() and int(pid) in pids:
            used += int(mib.strip() or 0)
    return used


class VramWatch:
    """The most VRAM some processes held while it ran (nvidia-smi every 0.3 s)."""

    def __init__(self, pids: set[int]) -> None:
        self.pids, self.peak_mib = pids, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.3):
            self.peak_mib = max(self.peak_mib, vram_of(self.pids))

    def close(self) -> int:
        self.stop.set()
        self.thread.join(60)
        return self.peak_mib


def generate(
    model: str, backend: str, rpc: str, layers: int, tokens: int, threads: int, gpu: bool
) -> dict[str, Any]:
    env = dict(os.environ)
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""  # a borrower with no GPU of its own
    argv = [sys.executable, "-c", CHILD, model, backend, rpc, str(layers), str(tokens)]
    # A borrower under a debugger, which prints where a crash happened: the GPU machine has
    # cuda-gdb (no gdb), which needs a GPU it may see, so LEND_DEBUGGER="env
    # CUDA_VISIBLE_DEVICES=0 cuda-gdb -batch -ex run -ex 'thread apply all bt' --args".
    debugger = shlex.split(os.environ.get("LEND_DEBUGGER", "")) if rpc else []
    done = subprocess.run(
        [*debugger, *argv, str(threads)], env=env, capture_output=True, text=True, timeout=RUN_S
    )
    last = [line for line in done.stdout.splitlines() if line.startswith("{")][-1:] or [""]
    if done.returncode != 0 or not last[0]:
        said = done.stdout[-6000:] + done.stderr[-8000:]
        raise SystemExit(f"{backend} {rpc} failed with exit code {done.returncode}:\n{said}")
    result: dict[str, Any] = json.loads(last[0])
    return result


def wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + READY_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the lender exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"the lender did not listen within {READY_S} s")


def direct(model: str, lent: int, tokens: int, threads: int) -> dict[str, Any]:
    """`rbee lender --device CUDA0` on loopback, the borrower connected straight to it."""
    port = free_port()
    argv = [sys.executable, "-m", "rbee", "lender", "--endpoint", f"127.0.0.1:{port}"]
    argv += ["--device", "CUDA0", "--hive-pid", str(os.getpid())]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    try:
        wait_listening(port, proc)
        idle_mib = vram_of({proc.pid})
        watch = VramWatch({proc.pid})
        result = generate(model, "cpu", f"127.0.0.1:{port}", lent, tokens, threads, gpu=False)
        result["lender_vram_peak_mib"] = watch.close()
        result["lender_vram_idle_mib"] = idle_mib
        return result
    finally:
        proc.kill()
        proc.wait(30)


def through_hive(model: str, lent: int, tokens: int, threads: int) -> dict[str, Any]:
    """A lending hive in this process, reached through a Tunnel: it must lend its GPU."""
    import psutil
    import zmq

    from rbee.hive.borrow import Tunnel
    from tests.helpers import hive_in_thread

    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    with tempfile.TemporaryDirectory() as data, hive_in_thread(Path(data)) as hive:
        tunnel = Tunnel(ctx, hive.front_endpoint, None, "p-gpu", "lend-gpu").start()
        pids: set[int] = set()
        seen: dict[str, Any] = {}

        def find_lender() -> None:  # the lease's lender, as soon as the hive starts it
            deadline = time.monotonic() + READY_S
            while time.monotonic() < deadline and not pids:
                for lease in list(hive.lending.leases.values()):
                    pids.add(lease.proc.pid)
                    seen["device"] = lease.lent.label
                    seen["argv"] = " ".join(psutil.Process(lease.proc.pid).cmdline()[-2:])
                time.sleep(0.05)

        finder = threading.Thread(target=find_lender, daemon=True)
        finder.start()
        watch = VramWatch(pids)
        result = generate(model, "cpu", tunnel.endpoint, lent, tokens, threads, gpu=False)
        result["lender_vram_peak_mib"] = watch.close()
        tunnel.close()
        finder.join(1)
        result.update(seen, tunnel_out_mib=tunnel.bytes_out >> 20, tunnel_failed=tunnel.failed)
    ctx.term()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--lent", type=int, default=12, help="layers on the lender")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    m, n, t, threads = args.model, args.lent, args.tokens, args.threads
    runs = {
        "cpu": generate(m, "cpu", "", 0, t, threads, gpu=False),
        "gpu": generate(m, "cuda", "", -1, t, threads, gpu=True),
        "cpu+local-gpu": generate(m, "cuda", "", n, t, threads, gpu=True),
        "cpu+lent-gpu": direct(m, n, t, threads),
        "cpu+hive-lent-gpu": through_hive(m, n, t, threads),
    }
    exact = runs["cpu+local-gpu"]["text"]
    summary = {
        "model": Path(m).name,
        "lent_layers": n,
        "runs": runs,
        "lent_equals_local_split": runs["cpu+lent-gpu"]["text"] == exact,
        "hive_lent_equals_local_split": runs["cpu+hive-lent-gpu"]["text"] == exact,
        "lent_equals_cpu": runs["cpu+lent-gpu"]["text"] == runs["cpu"]["text"],
        "lent_equals_gpu": runs["cpu+lent-gpu"]["text"] == runs["gpu"]["text"],
    }
    text = json.dumps(summary, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    ok = summary["lent_equals_local_split"] and summary["hive_lent_equals_local_split"]
    ok = ok and runs["cpu+hive-lent-gpu"].get("device", "").startswith("cuda")
    ok = ok and runs["cpu+lent-gpu"]["lender_vram_peak_mib"] > 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
