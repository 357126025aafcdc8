"""The floor of rbee's token stream: the same three hops in bare pyzmq, no rbee code.

    python bench/raw_relay.py RATE N

runs like `rbee infer -m synthetic:RATE -n N`: a publisher process (XPUB, like a worker; it waits
for the subscription, then sends N msgpack frames shaped like rbee's Token frames, paced as the
synthetic engine paces them), a relay process (XSUB → XPUB with ``zmq.proxy``, like the hive
but without looking at the frames) and this process as the subscriber (SUB, like the keeper:
it decodes each frame, writes its text to stdout and flushes). It ends with rbee's summary line
on stderr, with the same definitions. Each frame also carries its send time (CLOCK_MONOTONIC,
one clock for every process on the machine), so the last stderr line gives the true one-way
latency, publisher to subscriber, p50 and p99 in ms.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

import msgpack
import zmq

TOPIC = b"j-0123456789abcdef"


def relay() -> None:
    """XSUB (publishers connect) → XPUB (subscribers connect); prints both endpoints."""
    ctx = zmq.Context()
    xsub, xpub = ctx.socket(zmq.XSUB), ctx.socket(zmq.XPUB)
    for sock in (xsub, xpub):  # unlimited (set before bind, or it does not apply): no drops
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.bind("tcp://127.0.0.1:*")
    print(xsub.getsockopt_string(zmq.LAST_ENDPOINT), xpub.getsockopt_string(zmq.LAST_ENDPOINT))
    sys.stdout.flush()
    zmq.proxy(xsub, xpub)


def publish(endpoint: str, rate: float, n: int) -> None:
    """Wait for a subscriber, then send ``n`` frames and a terminal one."""
    ctx = zmq.Context()
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.connect(endpoint)
    pub.recv()  # the subscription, forwarded by the relay
    interval = 1.0 / rate if rate > 0 else 0.0
    next_at = time.perf_counter()
    job = TOPIC.decode()
    for i in range(n):
        if interval:
            next_at += interval
            time.sleep(max(0.0, next_at - time.perf_counter()))
        body = {"job_id": job, "seq": i, "text": f" w{i}", "token_id": i, "sent": time.monotonic()}
        pub.send_multipart([TOPIC, msgpack.packb({"v": 1, "t": "token", "r": 0, "b": body})])
    done = {"job_id": job, "seq": n, "tokens": n, "stop_reason": "length"}
    pub.send_multipart([TOPIC, msgpack.packb({"v": 1, "t": "done", "r": 0, "b": done})])
    pub.recv()  # the unsubscription: the subscriber has everything


def subscribe(rate: float, n: int) -> None:
    """Start the relay and the publisher, read the stream, print rbee's summary line."""
    started = time.monotonic()
    me = [sys.executable, __file__]
    relay_proc = subprocess.Popen([*me, "relay"], stdout=subprocess.PIPE, text=True)
    assert relay_proc.stdout is not None
    upstream, downstream = relay_proc.stdout.readline().split()
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.connect(downstream)
    sub.setsockopt(zmq.SUBSCRIBE, TOPIC)
    pub_proc = subprocess.Popen([*me, "publish", upstream, str(rate), str(n)])
    out = sys.stdout
    tokens, first, last, latency = 0, 0.0, 0.0, []
    while True:
        frame = msgpack.unpackb(sub.recv_multipart()[1])
        if frame["t"] != "token":
            break
        now = time.monotonic()
        latency.append((now - frame["b"]["sent"]) * 1000)
        out.write(frame["b"]["text"])
        out.flush()
        first = first or now
        last = now
        tokens += 1
    sub.close(0)
    out.write("\n")
    pub_proc.wait()
    relay_proc.kill()
    relay_proc.wait()
    rate_s = (tokens - 1) / (last - first) if last > first else 0.0
    cuts = statistics.quantiles(latency, n=100) if len(latency) > 1 else [0.0] * 99
    sys.stderr.write(
        f"[done] {tokens} tokens in {last - first:.2f} s ({rate_s:.1f} tokens/s); "
        f"first token after {(first - started) * 1000:.0f} ms\n"
        f"[latency] one-way p50 {cuts[49]:.3f} ms p99 {cuts[98]:.3f} ms\n"
    )


if __name__ == "__main__":
    if sys.argv[1] == "relay":
        relay()
    elif sys.argv[1] == "publish":
        publish(sys.argv[2], float(sys.argv[3]), int(sys.argv[4]))
    else:
        subscribe(float(sys.argv[1]), int(sys.argv[2]))
