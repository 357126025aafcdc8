"""6: the same request through llama.cpp's own llama-server, rbee's OpenAI gateway and
`rbee infer`: tokens/s and time to first token side by side.

The request: the default model, bench/stream_efficiency.py's raw prompt, greedy, 256 tokens
(the model does not end this text earlier, so no side needs to ignore end-of-sequence). Both
servers are warm (model loaded, one request served) and answer POST /v1/completions with
``stream: true``; one client (httpx) times both the same way: TTFT from sending the request to
the first event carrying text, tokens/s as 255 ÷ the time from the first to the last text event.
`rbee infer` reports its own (summary line: the keeper's request start → first token).

The peer is llama-server built from the very llama.cpp source llama-cpp-python vendors, with
rbee's engine flags and its CPU variants (bench/build_llama_server.sh: built once, cached), run
with its own default threads, one slot and a 4096-token context like a worker; where the hive's
engine probe turned extra buffer types off, the peer gets ``--no-repack`` (the same setting: on a
machine where repacking crashes, llama-server would crash too).

    python bench/peers.py [--reps 5]
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (
    RBEE,
    Row,
    default_model,
    free_port,
    infer_argv,
    run_one,
    running_hive,
    serving,
    standalone,
)
from stream_efficiency import PROMPT

TOKENS = 256
BENCH = Path(__file__).resolve().parent


def completion(base: str, model: str) -> tuple[float, float]:
    """One streamed completion: (tokens/s after the first, ms to the first text)."""
    import httpx

    body = {
        "model": model,
        "prompt": PROMPT,
        "max_tokens": TOKENS,
        "temperature": 0,
        "stream": True,
    }
    times: list[float] = []
    finish = None
    with httpx.Client(timeout=120) as client:
        started = time.perf_counter()
        with client.stream("POST", f"{base}/v1/completions", json=body) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                for choice in json.loads(line[6:]).get("choices", []):
                    if choice.get("text"):
                        times.append(time.perf_counter())
                    finish = choice.get("finish_reason") or finish
    if finish != "length" or len(times) < TOKENS // 2:
        raise SystemExit(f"{base}: finish_reason {finish}, {len(times)} text events")
    return (TOKENS - 1) / (times[-1] - times[0]), (times[0] - started) * 1000


def llama_server_argv(model: str, port: int) -> list[str]:
    """llama-server (built once) for ``model`` on loopback, set up like one of rbee's workers."""
    from rbee.hive.probe import for_model

    built = subprocess.run(
        [str(BENCH / "build_llama_server.sh")], check=True, capture_output=True, text=True
    )
    server = Path(built.stdout.split()[-1])
    choice = for_model(model)
    if choice.variant:  # the same CPU variant: a directory where it is the only one
        server = only_variant(server, choice.variant)
    argv = [str(server), "-m", model, "-c", "4096", "-np", "1"]
    argv += ["--host", "127.0.0.1", "--port", str(port)]
    return argv + ([] if choice.extra_bufts else ["--no-repack"])


def only_variant(server: Path, variant: str) -> Path:
    """A copy of llama-server beside its libraries and just one CPU variant (ggml loads the best
    variant it finds next to the executable, which it locates through /proc/self/exe: a copy,
    not a link)."""
    here = server.parent.parent / f"only-{variant}"
    if not (here / server.name).exists():
        here.mkdir(exist_ok=True)
        for lib in server.parent.glob("*.so*"):
            if not lib.name.startswith("libggml-cpu-") or lib.name == f"libggml-cpu-{variant}.so":
                (here / lib.name).unlink(missing_ok=True)
                (here / lib.name).symlink_to(lib)
        shutil.copy2(server, here / server.name)
    return here / server.name


def run(reps: int) -> list[Row]:
    """Interleaved repetitions: llama-server, rbee's gateway, `rbee infer`."""
    model = str(default_model())
    peer_port, gateway_port = free_port(), free_port()
    peer_argv = llama_server_argv(model, peer_port)
    gateway_argv = [*RBEE, "serve", "--listen", f"127.0.0.1:{gateway_port}"]
    cli = infer_argv("--raw", "-t", "0", "-n", str(TOKENS), PROMPT)
    peer, gateway, infer = [], [], []
    with (
        tempfile.TemporaryDirectory() as tmp,
        running_hive(tmp) as hive,
        serving(peer_argv, None, peer_port, "/v1/models") as peer_server,
        serving(gateway_argv, hive.env, gateway_port, "/health") as gateway_server,
    ):
        peer_url, gateway_url = peer_server.base, gateway_server.base
        completion(peer_url, "peer")  # warm: the first request of each
        completion(gateway_url, "smollm2-135m-instruct")  # loads rbee's worker
        for _ in range(reps):
            peer.append(completion(peer_url, "peer"))
            gateway.append(completion(gateway_url, "smollm2-135m-instruct"))
            summary = run_one(cli, hive.env).summary()
            infer.append((summary.tokens_per_s, float(summary.first_token_ms)))
    rows = []
    for label, side in (("rbee gateway", gateway), ("`rbee infer`", infer)):
        rows.append(
            Row(
                "6",
                f"peers: {label} ÷ llama-server, tokens/s",
                [s[0] / p[0] for s, p in zip(side, peer, strict=True)],
                rbee=[s[0] for s in side],
                baseline=[p[0] for p in peer],
                op="≥",
                target=0.95,
                digits=3,
            )
        )
        rows.append(
            Row(
                "6",
                f"peers: {label} − llama-server, time to first token",
                [s[1] - p[1] for s, p in zip(side, peer, strict=True)],
                unit="ms",
                rbee=[s[1] for s in side],
                baseline=[p[1] for p in peer],
                op="≤",
                target=0,
                note="HTTP: request sent → first text event; `rbee infer`: its summary line"
                if label == "rbee gateway"
                else "",
            )
        )
    return rows


if __name__ == "__main__":
    sys.exit(standalone(run, 5))
