"""Downloads: rbee's verified, resumable transfer ÷ a plain HTTP read of the same file from the
same local Hub server, and the bytes fetched again after a connection is cut mid-file.

The server (tests/hub_server.py, speaking the Hub's HTTP API) runs in its own process so it does
not share the client's interpreter lock. The plain read streams the same URL with httpx2 and
writes to a file, which is what any download must at least do; rbee's adds sha256 verification,
a part file, fsync and an atomic rename. Interleaved runs; medians and spreads.

    python bench/download.py [--size-mib 256] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO = "bench/model-GGUF"
FILE = "model.Q4_K_M.gguf"
CHUNK_BYTES = 1 << 20


def serve(
    size: int,
    ready: multiprocessing.Queue,
    stop: multiprocessing.Event,  # type: ignore[type-arg]
    cut_after: int | None,
) -> None:
    from tests.hub_server import FakeHub, FakeRepo, gguf_blob

    with FakeHub({REPO: FakeRepo(files={FILE: gguf_blob(size)})}) as hub:
        if cut_after is not None:
            hub.faults.cut_after_bytes = cut_after
        ready.put((hub.endpoint, hub.repos[REPO].commit))
        stop.wait(600)
        ready.put(hub.bytes_served(REPO, FILE))


def plain_read(url: str, dest: Path) -> float:
    import httpx2

    started = time.perf_counter()
    with httpx2.stream("GET", url, follow_redirects=True, timeout=60) as r, dest.open("wb") as f:
        for chunk in r.iter_raw(CHUNK_BYTES):
            f.write(chunk)
    return time.perf_counter() - started


def rbee_fetch(models: Path) -> float:
    from rbee.hub.download import DownloadManager

    started = time.perf_counter()
    with DownloadManager(models) as manager:
        manager.pull(f"hf:{REPO}")
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", type=Path, default=Path("bench/results/download.json"))
    args = parser.parse_args()
    size = args.size_mib << 20
    ctx = multiprocessing.get_context("spawn")
    results: dict[str, list[float]] = {"plain_mb_s": [], "rbee_mb_s": []}
    served = 0
    for cut in (None, size // 2):
        ready, stop = ctx.Queue(), ctx.Event()
        server = ctx.Process(target=serve, args=(size, ready, stop, cut), daemon=True)
        server.start()
        endpoint, commit = ready.get(timeout=120)
        os.environ["HF_ENDPOINT"] = endpoint
        url = f"{endpoint}/{REPO}/resolve/{commit}/{FILE}"
        try:
            with tempfile.TemporaryDirectory() as tmp:
                if cut is None:
                    for rep in range(args.reps):
                        plain = plain_read(url, Path(tmp) / f"plain-{rep}")
                        fetched = rbee_fetch(Path(tmp) / f"models-{rep}")
                        results["plain_mb_s"].append(size / plain / 1e6)
                        results["rbee_mb_s"].append(size / fetched / 1e6)
                        for p in Path(tmp).iterdir():
                            if p.is_file():
                                p.unlink()
                else:
                    rbee_fetch(Path(tmp) / "resume")  # the first attempt is cut, then resumed
        finally:
            stop.set()
            served = ready.get(timeout=60)
            server.join(30)
        if cut is not None:
            refetched = served - size
            print(
                f"connection cut at {cut >> 20} MiB: resumed with Range; {served} bytes served "
                f"for a {size}-byte file, {refetched} fetched again"
            )
            results["refetched_bytes"] = [float(refetched)]
    med = statistics.median
    ratio = [r / p for r, p in zip(results["rbee_mb_s"], results["plain_mb_s"], strict=True)]
    print(f"{'measure':40} {'median':>10} {'spread':>20}")
    for name, values in (
        ("plain HTTP read (MB/s)", results["plain_mb_s"]),
        ("rbee verified download (MB/s)", results["rbee_mb_s"]),
        ("rbee ÷ plain", ratio),
    ):
        print(f"{name:40} {med(values):10.2f} {min(values):9.2f}–{max(values):<9.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({**results, "ratio": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
