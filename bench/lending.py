"""20: one model across two hosts, rbee's lent memory against llama.cpp's own rpc-server.

Two network-namespace hosts on a bridge (tests/lan.py), the default model, greedy, the same
split on every side: host 1 keeps the first layers, host 2 holds the rest (llama.cpp offloads
the last layers to the remote device, the output layer among them).

- rbee: hive ``alpha`` on host 1 with ``--memory-limit`` (so the model does not fit it whole)
  and ``--parallel 1``, hive ``beta`` on host 2 lending; alpha paired with beta as a hive and a
  keeper on host 1 paired with alpha; ``rbee serve --node alpha`` on host 1. The split is the one
  alpha plans, read back from ``rbee ps`` (``cpu+beta H+N/T``: N layers on beta).
- llama.cpp RPC: ``rpc-server -H host2 -p 50052`` on host 2 (plaintext on the bridge, as
  llama.cpp runs it), llama-server on host 1 with ``--rpc host2:50052 -ngl N``: the same N.
- unsplit: llama-server on host 1 with every layer there.

Every server has one slot of 4096 tokens and 2 threads (``-t``/``--threads``; rpc-server ``-t``).
The same client for all (bench/batching.py's streamed ``/v1/completions``, run inside host 1):
generation, one stream of ``--tokens`` tokens after a short prompt, tokens after the first ÷ their
time; prompt processing, a ~1,700-token prompt with ``max_tokens`` 1 and no prompt cache, prompt
tokens ÷ time to the first token. All servers run at once (idle ones take no CPU) and the
repetitions are interleaved (rbee, RPC, unsplit); the table shows medians and spreads. Figures: rbee
÷ llama.cpp RPC (target ≥ 0.9 for both) and rbee ÷ unsplit. Needs root (namespaces) and builds
llama-server and rpc-server once (bench/build_llama_server.sh).

    sudo python bench/lending.py [--reps 3] [--tokens 128] [--limit 200M] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from batching import build_llama_server
from common import Row, default_model, machine, markdown, table
from peers import only_variant

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.lan import Host, Lan, available

BENCH = Path(__file__).resolve().parent
CATALOG_NAME = "smollm2-135m-instruct"  # the bundled model, as rbee serve names it
RPC_PORT = 50052
HTTP_PORT = 8080
PEER_PORTS = (8081, 8082)  # llama-server with --rpc, and unsplit
THREADS = 2
LONG_PROMPT = " ".join(f"item{i}" for i in range(450))  # ~1,700 tokens


def measure(host: Host, base: str, model: str, tokens: int, tag: str) -> dict[str, float]:
    """Inside ``host``: one generation stream and one long-prompt request, as JSON figures."""
    code = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(BENCH)!r})\n"
        "from batching import streams\n"
        f"gen = streams({base!r}, {model!r}, [{('Tell me a story ' + tag)!r}], {tokens}, 600)[0]\n"
        f"pp = streams({base!r}, {model!r}, [{(tag + ' ' + LONG_PROMPT)!r}], 1, 600, False)[0]\n"
        "print(json.dumps({'gen': gen.tokens_per_s, 'ttft_ms': pp.ttft_ms}))\n"
    )
    done = subprocess.run(
        host.argv([sys.executable, "-c", code]), capture_output=True, text=True, timeout=900
    )
    if done.returncode != 0:
        raise SystemExit(f"measuring {base} failed:\n{done.stderr[-3000:]}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def prompt_tokens(host: Host, base: str, model: str) -> int:
    """How many tokens the long prompt is (llama-server's /tokenize)."""
    code = (
        "import httpx, json\n"
        f"r = httpx.post({base + '/tokenize'!r}, json={{'content': {LONG_PROMPT!r}}}, timeout=60)\n"
        "print(len(r.json()['tokens']))\n"
    )
    done = subprocess.run(host.argv([sys.executable, "-c", code]), capture_output=True, text=True)
    return int(done.stdout.strip() or 0)


@contextlib.contextmanager
def started(host: Host, argv: list[str], env: dict[str, str] | None = None) -> Iterator[None]:
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(host.argv(argv), env=env, stdout=log, stderr=log)
        try:
            yield
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def wait_http(host: Host, base: str, path: str, timeout: float = 180) -> None:
    code = (
        "import httpx, time\n"
        f"deadline = time.monotonic() + {timeout}\n"
        "while True:\n"
        "    try:\n"
        f"        if httpx.get({base + path!r}, timeout=1).status_code == 200: break\n"
        "    except httpx.HTTPError: pass\n"
        "    if time.monotonic() > deadline: raise SystemExit('no answer')\n"
        "    time.sleep(0.2)\n"
    )
    subprocess.run(host.argv([sys.executable, "-c", code]), check=True, timeout=timeout + 10)


def rbee(host: Host, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        host.argv([sys.executable, "-m", "rbee", *args]),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def pair(hive: Host, hive_env: dict[str, str], other: Host, env: dict[str, str], role: str) -> None:
    """`rbee hive pair --role ROLE` on ``hive``, `rbee pair ADDRESS CODE` on ``other``."""
    name = hive_env["NODE"]
    argv = [sys.executable, "-m", "rbee", "hive", "pair", "--node-name", name, "--role", role]
    server = subprocess.Popen(hive.argv(argv), env=hive_env, stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    code = re.search(r"\d{4}-\d{4}", server.stdout.readline())
    assert code is not None
    paired = rbee(other, env, "pair", f"{hive.address}:7830", code.group(0))
    server.wait(30)
    if paired.returncode != 0:
        raise SystemExit(f"pairing with {name} failed: {paired.stderr}")


def run(args: argparse.Namespace) -> tuple[list[Row], dict[str, Any]]:
    from rbee.hive.probe import for_model

    model = str(default_model())
    server = build_llama_server()
    rpc_server = server.parent / "rpc-server"
    choice = for_model(model)
    if choice.variant:  # the CPU variant rbee's workers run, alone beside each binary
        server, rpc_server = (
            only_variant(server, choice.variant),
            only_variant(rpc_server, choice.variant),
        )
    raw: dict[str, list[dict[str, float]]] = {"rbee": [], "rpc": [], "unsplit": []}
    info: dict[str, Any] = {}
    with Lan.create(2, subnet=9) as lan, tempfile.TemporaryDirectory() as tmp:
        h1, h2 = lan.hosts
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("RBEE_")}

        def env(name: str, host: Host) -> dict[str, str]:
            return {
                **base_env,
                "RBEE_DATA_DIR": f"{tmp}/{name}",
                "RBEE_MDNS_INTERFACES": host.address,
                "NODE": name,
            }

        alpha, beta, keeper = env("alpha", h1), env("beta", h2), env("keeper", h1)
        hive = [sys.executable, "-m", "rbee", "hive", "--host", "0.0.0.0", "--threads", "2"]
        alpha_argv = [*hive, "--node-name", "alpha", "--parallel", "1", "--memory-limit"]
        with (
            started(h1, [*alpha_argv, args.limit], alpha),
            started(h2, [*hive, "--node-name", "beta"], beta),
        ):
            time.sleep(3)
            pair(h1, alpha, h1, keeper, "infer")
            pair(h2, beta, h1, alpha, "hive")
            alpha_at = f"{h1.address}:7830"  # by address: mDNS does not loop back to its own host
            serve = [sys.executable, "-m", "rbee", "serve", "--node", alpha_at]
            serve += ["--listen", f"127.0.0.1:{HTTP_PORT}"]
            rbee_base = f"http://127.0.0.1:{HTTP_PORT}"
            peer = [str(server), "-m", model, "-c", "4096", "-np", "1", "-t", str(THREADS)]
            peer += ["-tb", str(THREADS), "--host", "127.0.0.1"]
            peer += [] if choice.extra_bufts else ["--no-repack"]
            rpc = [str(rpc_server), "-H", h2.address, "-p", str(RPC_PORT), "-t", str(THREADS)]
            with started(h1, serve, keeper), started(h2, rpc):
                wait_http(h1, rbee_base, "/v1/models")
                time.sleep(3)  # alpha looks for lenders at once after pairing
                measure(h1, rbee_base, CATALOG_NAME, 8, "warm-up")
                ps = rbee(h1, keeper, "ps", "--node", alpha_at).stdout
                split = re.search(r"cpu\+beta (\d+)\+(\d+)/(\d+)", ps)
                if split is None:
                    raise SystemExit(f"alpha did not borrow from beta:\n{ps}")
                here, lent, total = (int(g) for g in split.groups())
                info["split"] = {"alpha": here, "beta": lent, "layers": total}
                print(f"[split] alpha {here} layers, beta {lent} of {total}", flush=True)
                remote = ["--rpc", f"{h2.address}:{RPC_PORT}", "-ngl", str(lent)]
                rpc_base, alone_base = (f"http://127.0.0.1:{p}" for p in PEER_PORTS)
                with (
                    started(h1, [*peer, "--port", str(PEER_PORTS[0]), *remote]),
                    started(h1, [*peer, "--port", str(PEER_PORTS[1]), "-ngl", "0"]),
                ):
                    for base in (rpc_base, alone_base):
                        wait_http(h1, base, "/health")
                        measure(h1, base, model, 8, "warm-up")
                    info["prompt_tokens"] = prompt_tokens(h1, alone_base, model)
                    sides = {"rbee": (rbee_base, CATALOG_NAME), "rpc": (rpc_base, model)}
                    sides["unsplit"] = (alone_base, model)
                    for rep in range(args.reps):  # interleaved: drift on a shared machine
                        for name, (base, asked) in sides.items():
                            figures = measure(h1, base, asked, args.tokens, f"r{rep}")
                            raw[name].append(figures)
                            print(f"[rep {rep + 1}] {name} {figures}", flush=True)
    n = info.get("prompt_tokens", 0)

    def pp(figures: dict[str, float]) -> float:
        return n / (figures["ttft_ms"] / 1000) if n else float("nan")

    rows = []
    for base_name, what in (("rpc", "llama.cpp rpc-server"), ("unsplit", "unsplit, one host")):
        target = ("≥", 0.9) if base_name == "rpc" else ("", 0.0)
        for measure_name, get in (("generation", lambda f: f["gen"]), ("prompt", pp)):
            ours = [get(f) for f in raw["rbee"]]
            theirs = [get(f) for f in raw[base_name]]
            rows.append(
                Row(
                    "20",
                    f"split over 2 hosts, {measure_name} tokens/s: rbee ÷ {what}",
                    [a / b for a, b in zip(ours, theirs, strict=True)],
                    rbee=ours,
                    baseline=theirs,
                    op=target[0],
                    target=target[1],
                    digits=3,
                )
            )
    return rows, {"raw": raw, **info}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--limit", default="200M", help="alpha's --memory-limit")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if why := available():
        raise SystemExit(f"bench/lending.py needs network namespaces: {why}")
    rows, info = run(args)
    print()
    print(table(rows))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": machine(),
                    "rows": [r.to_json() for r in rows],
                    "markdown": markdown(rows),
                    **info,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
