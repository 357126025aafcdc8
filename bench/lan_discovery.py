"""Discovery on a LAN of network namespaces (run as root): how fast hives are found and dropped.

Three hosts on a bridge; hives on two, the keeper on the third. Prints, as medians over runs:
  1. `rbee nodes` (the survey: browse + parallel status, in process) until all hives are listed,
     and the whole `rbee nodes` command's wall time (with interpreter start-up) beside it;
  2. hive start (process launch) until a browser on the keeper's host sees it;
  3. a SIGKILLed hive until a new survey no longer offers it. (A long-running python-zeroconf
     browser would keep it listed: that library raises PTR TTLs below 1125 s to 1125 s, so
     keepers check each hive's liveness with a deadline instead of trusting announcements.)

    sudo .venv/bin/python bench/lan_discovery.py [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.lan import Lan, available

WATCHER = r"""
import sys, time
from zeroconf import Zeroconf, ServiceBrowser, ServiceStateChange, IPVersion
zc = Zeroconf(interfaces=[sys.argv[1]], ip_version=IPVersion.V4Only)
def on(zeroconf, service_type, name, state_change):
    print(f"{time.monotonic():.6f} {state_change.name} {name}", flush=True)
ServiceBrowser(zc, "_rbee._tcp.local.", handlers=[on])
print("watching", flush=True)
time.sleep(float(sys.argv[2]))
zc.close()
"""

SURVEY = r"""
import time, zmq
from rbee.keeper.survey import survey
t = time.monotonic()
views = survey(zmq.Context(), browse_s=1.5)
print(f"{time.monotonic() - t:.6f} {len(views)}")
"""


def run(host_argv: list[str], env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*host_argv, sys.executable, *args], env=env, capture_output=True, text=True, timeout=60
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", type=Path, default=Path("bench/results/lan_discovery.json"))
    args = parser.parse_args()
    if why := available():
        raise SystemExit(f"cannot build a LAN here: {why}")
    results: dict[str, list[float]] = {
        "survey_ms": [],
        "nodes_cmd_ms": [],
        "start_to_seen_ms": [],
        "kill_to_unoffered_survey_ms": [],
    }
    with tempfile.TemporaryDirectory() as tmp, Lan.create(3, subnet=9) as lan:
        h1, h2, h3 = lan.hosts
        base = {**os.environ, "RBEE_CLUSTER": f"bench-{os.getpid()}"}
        for key in ("RBEE_HIVE_PORT", "RBEE_STREAM_PORT"):
            base.pop(key, None)

        def env(host: object, name: str) -> dict[str, str]:
            return {**base, "RBEE_DATA_DIR": f"{tmp}/{name}", "RBEE_MDNS_INTERFACES": host.address}  # type: ignore[attr-defined]

        keeper = env(h3, "keeper")
        for _ in range(args.runs):
            watcher = subprocess.Popen(
                h3.argv([sys.executable, "-c", WATCHER, h3.address, "60"]),
                env=keeper,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert watcher.stdout is not None and watcher.stdout.readline() == "watching\n"
            hives = []
            started = {}
            for host, name in ((h1, "alpha"), (h2, "beta")):
                started[name] = time.monotonic()
                hives.append(
                    subprocess.Popen(
                        host.argv(
                            [
                                sys.executable,
                                "-m",
                                "rbee",
                                "hive",
                                "--host",
                                "0.0.0.0",
                                "--node-name",
                                name,
                            ]
                        ),
                        env=env(host, name),
                        stderr=subprocess.DEVNULL,
                    )
                )
            seen: dict[str, float] = {}
            while len(seen) < 2:
                stamp, state, name = watcher.stdout.readline().split()
                if state == "Added":
                    seen[name.split("-")[0]] = float(stamp)
            results["start_to_seen_ms"] += [(seen[n] - started[n]) * 1000 for n in started]
            time.sleep(1.0)
            out = run(h3.argv([]), keeper, "-c", SURVEY).stdout.split()
            assert out[1] == "2", out
            results["survey_ms"].append(float(out[0]) * 1000)
            t = time.monotonic()
            listed = json.loads(run(h3.argv([]), keeper, "-m", "rbee", "nodes", "--json").stdout)
            results["nodes_cmd_ms"].append((time.monotonic() - t) * 1000)
            assert len(listed) == 2
            killed_at = time.monotonic()
            hives[0].send_signal(signal.SIGKILL)
            hives[0].wait()
            while True:
                names = [
                    n["name"]
                    for n in json.loads(
                        run(h3.argv([]), keeper, "-m", "rbee", "nodes", "--json").stdout
                    )
                ]
                if "alpha" not in names:
                    results["kill_to_unoffered_survey_ms"].append(
                        (time.monotonic() - killed_at) * 1000
                    )
                    break
            for proc in (hives[1], watcher):
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
    targets = {"survey_ms": 250, "start_to_seen_ms": 1500, "kill_to_unoffered_survey_ms": 10000}
    print(f"{'measure':38} {'median ms':>10} {'spread ms':>18} {'target':>8}")
    for key, values in results.items():
        target = f"<{targets[key]}" if key in targets else ""
        print(
            f"{key:38} {statistics.median(values):10.0f} "
            f"{min(values):8.0f}–{max(values):<9.0f} {target:>8}"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
