"""Lent memory: `rbee lender` (llama.cpp's RPC server) holding a real model's layers for an
engine in another process, over loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import rbee_cmd, run_rbee

READY_TIMEOUT_S = 30.0

# One greedy job through the worker's own loop, in a process of its own (RPC devices join the
# process's ggml registry for good): prints the text and where the layers went.
GENERATE = """
import json, sys
from rbee.protocol.messages import Done, GenerateParams, RunJob, Token
from rbee.hive import probe
from rbee.worker.engine import Engine
from rbee.worker.slots import run_alone

model, rpc, layers = sys.argv[1], sys.argv[2], int(sys.argv[3])
choice = probe.for_model(model)  # as a hive runs its workers (issue 11: fast paths that crash)
engine = Engine(model, 512, lambda _: None, rpc=[rpc] if rpc else [], gpu_layers=layers,
                extra_bufts=choice.extra_bufts)
params = GenerateParams(prompt="The capital of France is", max_tokens=32, temperature=0.0,
                        raw=True, ignore_eos=True)
frames = run_alone(engine, RunJob(job_id="j-rpc", params=params))
done = frames[-1]
assert isinstance(done, Done), done
text = "".join(f.text for f in frames if isinstance(f, Token)) + done.tail
print(json.dumps({"text": text, "on_rpc": engine.gpu_layers, "layers": engine.n_layers}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1]
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"the lender did not listen on {port} within {READY_TIMEOUT_S} s")


@pytest.fixture
def lender(tmp_path: Path, rbee_env: dict[str, str]) -> Iterator[tuple[str, Path]]:
    """A lender on a loopback port, as a hive starts it: its endpoint and tensor cache."""
    port, cache = free_port(), tmp_path / "rpc-cache"
    argv = rbee_cmd("lender", "--endpoint", f"127.0.0.1:{port}", "--cache-dir", str(cache))
    argv += ["--threads", "1", "--hive-pid", str(os.getpid())]
    proc = subprocess.Popen(argv, env=rbee_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_port(port, proc)  # type: ignore[arg-type]
        yield f"127.0.0.1:{port}", cache
    finally:
        proc.kill()
        proc.wait(10)


def generate(model_path: Path, rpc: str, layers: int, env: dict[str, str]) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", GENERATE, str(model_path), rpc, str(layers)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_layers_in_lent_memory_write_what_the_model_writes_alone(
    lender: tuple[str, Path], model_path: Path, rbee_env: dict[str, str]
) -> None:
    endpoint, _ = lender
    alone = generate(model_path, "", 0, rbee_env)
    split = generate(model_path, endpoint, 15, rbee_env)
    assert split["on_rpc"] == 15
    assert split["text"] == alone["text"] and len(str(alone["text"])) > 40, (split, alone)


@pytest.mark.parametrize(
    "endpoint", ["0.0.0.0:50052", "192.168.1.5:50052", "localhost:50052", "127.0.0.1", "::1:0"]
)
def test_a_lender_binds_loopback_only(endpoint: str, rbee_env: dict[str, str]) -> None:
    ran = run_rbee("lender", "--endpoint", endpoint, env=rbee_env)
    assert ran.returncode != 0 and "must be a loopback address and port" in ran.stderr, ran.stderr


def test_a_tunnel_carries_the_layers_to_a_lending_hive(
    tmp_path: Path, model_path: Path, rbee_env: dict[str, str]
) -> None:
    """The worker's RPC connection goes to a tunnel of its hive, the tunnel to the lending
    hive's front socket, that hive to a lender it starts; the text is the model's own, the
    lender is gone when the borrower is done, and a second load does not send again the
    tensors the lender keeps in its cache (llama.cpp caches those over 10 MiB by hash)."""
    import zmq

    from rbee.hive.borrow import Tunnel
    from tests.helpers import hive_in_thread

    alone = generate(model_path, "", 0, rbee_env)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    with hive_in_thread(tmp_path / "data") as lending:
        tunnel = Tunnel(ctx, lending.front_endpoint, None, "p-test", "smollm2").start()
        split = generate(model_path, tunnel.endpoint, 20, rbee_env)
        tunnel.close()  # as the hive does when the worker exits
        assert not tunnel.failed and tunnel.reason == "closed by this hive", tunnel.reason
        assert tunnel.bytes_out > 30_000_000 and tunnel.bytes_in > 1000  # 20 layers went
        deadline = time.monotonic() + 10
        while lending.lending.leases and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not lending.lending.leases, "the lending hive still holds the lease"
        cached = list((tmp_path / "data" / "rpc-cache").iterdir())
        assert cached, "the lender kept no tensor"
        again = Tunnel(ctx, lending.front_endpoint, None, "p-again", "smollm2").start()
        second = generate(model_path, again.endpoint, 20, rbee_env)
        again.close()
        assert second["text"] == alone["text"]
        cached_bytes = sum(p.stat().st_size for p in cached)
        assert again.bytes_out <= tunnel.bytes_out - cached_bytes + 1_000_000
    ctx.term()
    assert split["on_rpc"] == 20 and split["text"] == alone["text"], (split, alone)
