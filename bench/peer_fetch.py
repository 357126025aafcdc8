"""23: a model fetched from peer hives, against a plain read over the same link.

Four network-namespace hosts on a bridge (tests/lan.py): the local Hub server (tests/hub_server.py)
on host 4, hives alpha, beta and gamma on hosts 1-3; beta paired with alpha and gamma as a hive.
alpha pulls the default model (98 MB) from the Hub; then, ``--reps`` times each, beta forgets it
and pulls it again, from its peers only (the bytes: the pull's own "fetched from peers" log line,
from the first chunk request to the last chunk written, every chunk checked):

- **one peer ÷ a plain read**: the same bytes sent by a bare TCP socket (``sendfile``) from host 1
  to host 2 and thrown away, with host 1's link shaped to ``--link`` (tc tbf, 1 Gbit/s as on a
  wired LAN; target ≥ 0.9), and with no shaping at all (the CPU's bound: CURVE and hashing);
- **two rate-limited peers ÷ one**: alpha and gamma started with ``--share-rate`` (target ≥ 1.6).

Needs root (namespaces, tc).

    sudo python bench/peer_fetch.py [--reps 3] [--link 1gbit] [--share-rate 25M] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from common import default_model, machine

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.hub_server import FakeHub, FakeRepo
from tests.integration.test_lan import env_for, hive_on, pair, rbee_on, wait_listed
from tests.lan import Host, Lan, available, inside

REPO, FILE = "bench/SmolLM2-135M-Instruct-GGUF", "SmolLM2-135M-Instruct.Q4_1.gguf"
REFERENCE = f"hf:{REPO}/{FILE}"
PLAIN_PORT = 9099


def plain_read(sender: Host, receiver: Host, path: Path) -> float:
    """MB/s of a bare TCP transfer of ``path`` from ``sender`` to ``receiver`` (to memory)."""
    serve = (
        "import socket, sys\n"
        f"s = socket.create_server(({sender.address!r}, {PLAIN_PORT}))\n"
        "c, _ = s.accept()\n"
        f"with open({str(path)!r}, 'rb') as f: c.sendfile(f)\n"
        "c.close()\n"
    )
    read = (
        "import socket, time\n"
        "buf = bytearray(1 << 20)\n"
        "for _ in range(100):\n"
        "    try:\n"
        f"        c = socket.create_connection(({sender.address!r}, {PLAIN_PORT})); break\n"
        "    except OSError: time.sleep(0.05)\n"
        "t, n = time.perf_counter(), 0\n"
        "while (k := c.recv_into(buf)): n += k\n"
        "print(n / (time.perf_counter() - t) / 1e6)\n"
    )
    server = subprocess.Popen(sender.argv([sys.executable, "-c", serve]))
    try:
        done = subprocess.run(
            receiver.argv([sys.executable, "-c", read]), capture_output=True, text=True, timeout=120
        )
    finally:
        server.wait(30)
    return float(done.stdout)


def fetched(host: Host, keeper: dict[str, str], beta: dict[str, str], h_keeper: Host) -> float:
    """Forget the model on beta, pull it from peers only, and return the fetch's MB/s."""
    listed = json.loads(rbee_on(host, beta, "models", "list", "--json").stdout)
    for m in listed:
        if "/models/hf/" in m["path"]:
            rbee_on(host, beta, "models", "rm", m["name"])
    pull = rbee_on(h_keeper, keeper, "models", "pull", REFERENCE, "--node", "beta", "--no-hub")
    if pull.returncode != 0:
        raise SystemExit(f"beta's pull failed: {pull.stderr}")
    logs = rbee_on(h_keeper, keeper, "logs", "beta").stdout
    rates = re.findall(r"fetched from peers .*?mb_per_s=([\d.]+) complete=True", logs)
    if not rates:
        raise SystemExit(f"no fetch in beta's log: {logs[-2000:]}")
    return float(rates[-1])


@contextmanager
def shaped(host: Host, rate: str) -> Iterator[None]:
    """``host``'s outgoing link limited to ``rate`` (tc tbf)."""
    qdisc = ["tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", rate]
    subprocess.run(host.argv([*qdisc, "burst", "512kb", "latency", "50ms"]), check=True)
    try:
        yield
    finally:
        subprocess.run(host.argv(["tc", "qdisc", "del", "dev", "eth0", "root"]), check=False)


def run(args: argparse.Namespace) -> dict[str, Any]:
    model = default_model()
    data = model.read_bytes()
    results: dict[str, Any] = {"machine": machine(), "bytes": len(data), "link_rate": args.link}
    base_env = {**os.environ, "RBEE_LOG_LEVEL": "info"}
    with Lan.create(4, subnet=12) as lan, tempfile.TemporaryDirectory() as tmp:
        h1, h2, h3, h4 = lan.hosts
        with inside(h4):
            repos = {REPO: FakeRepo(files={FILE: data})}
            hub = FakeHub(repos, host=h4.address, redirect_host=h4.address)
        base = {**base_env, "HF_ENDPOINT": hub.endpoint}
        alpha, beta = env_for(h1, base, Path(tmp), "alpha"), env_for(h2, base, Path(tmp), "beta")
        gamma, keeper = (
            env_for(h3, base, Path(tmp), "gamma"),
            env_for(h4, base, Path(tmp), "keeper"),
        )
        with hub, ExitStack() as stack:
            hives = {
                "alpha": stack.enter_context(hive_on(h1, alpha, "alpha")),
                "beta": stack.enter_context(hive_on(h2, beta, "beta")),
                "gamma": stack.enter_context(hive_on(h3, gamma, "gamma")),
            }
            wait_listed(h4, keeper, {"alpha", "beta", "gamma"})
            for host, env, name in ((h1, alpha, "alpha"), (h2, beta, "beta"), (h3, gamma, "gamma")):
                assert pair(host, env, h4, keeper, role="admin", name=name).returncode == 0
            for host, env, name in ((h1, alpha, "alpha"), (h3, gamma, "gamma")):
                assert pair(host, env, h2, beta, role="hive", name=name).returncode == 0
            assert (
                rbee_on(h4, keeper, "models", "pull", REFERENCE, "--node", "alpha").returncode == 0
            )
            held = next(Path(alpha["RBEE_DATA_DIR"], "models", "hf").glob(f"*/*/{FILE}"))

            for label, shaping in (("link", args.link), ("unshaped", "")):
                with ExitStack() as shape:
                    if shaping:
                        shape.enter_context(shaped(h1, shaping))
                    plain = [plain_read(h1, h2, held) for _ in range(args.reps)]
                    peer = [fetched(h2, keeper, beta, h4) for _ in range(args.reps)]
                results[label] = {"plain_mb_s": plain, "peer_mb_s": peer}
                ratio = statistics.median(peer) / statistics.median(plain)
                results[label]["ratio"] = ratio
                print(f"{label}: plain {plain} MB/s, one peer {peer} MB/s: {ratio:.3f}", flush=True)

            # Two rate-limited peers against one: alpha and gamma restart with --share-rate.
            for name in ("alpha", "gamma"):
                hives[name].terminate()
                hives[name].wait(30)
            rate = ["--share-rate", args.share_rate]
            stack.enter_context(hive_on(h1, alpha, "alpha", *rate))
            stack.enter_context(hive_on(h3, gamma, "gamma", *rate))
            time.sleep(2)
            one = [fetched(h2, keeper, beta, h4) for _ in range(args.reps)]
            assert (
                rbee_on(h4, keeper, "models", "pull", REFERENCE, "--node", "gamma").returncode == 0
            )
            two = [fetched(h2, keeper, beta, h4) for _ in range(args.reps)]
            ratio = statistics.median(two) / statistics.median(one)
            results["rate_limited"] = {"share_rate": args.share_rate, "one": one, "two": two}
            results["rate_limited"]["ratio"] = ratio
            print(f"share rate {args.share_rate}: one peer {one}, two {two} MB/s: {ratio:.3f}")
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--link", default="1gbit", help="tc rate of the sender's link")
    parser.add_argument("--share-rate", default="25M", help="each peer's --share-rate")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if available():
        raise SystemExit(available())
    results = run(args)
    link, raw, limited = results["link"], results["unshaped"], results["rate_limited"]
    print(
        f"\none peer ÷ plain read over a {args.link} link: {link['ratio']:.3f} (target ≥ 0.9)\n"
        f"one peer ÷ plain read, unshaped veth: {raw['ratio']:.3f}\n"
        f"two peers ÷ one at --share-rate {args.share_rate}: {limited['ratio']:.3f} "
        "(target ≥ 1.6)"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
