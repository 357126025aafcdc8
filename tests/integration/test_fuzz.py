"""100,000 random and mutated frames at a running hive: it must keep serving, and a real
inference must work afterwards."""

from __future__ import annotations

import random
from pathlib import Path

import msgpack
import zmq

from rbee.protocol.codec import encode
from rbee.protocol.messages import (
    FRAME_TYPES,
    Cancel,
    EnsureWorker,
    FetchFrames,
    GenerateParams,
    Hello,
    HelloReply,
    ListWorkers,
    StartJob,
    Status,
    StopWorker,
)
from tests.helpers import hive_in_thread, keeper
from tests.integration.test_hive_worker import MODEL, ensure, run_job

FRAMES = 100_000
SEED = 20261127
DRAIN_EVERY = 500


def seeds() -> list[bytes]:
    params = GenerateParams(prompt="hi", max_tokens=4)
    valid = [
        Hello(client="fuzz"),
        Status(),
        ListWorkers(),
        EnsureWorker(model="no-such-model"),
        StartJob(job_id="j-1", model="x", params=params, worker_id="w-x"),
        Cancel(job_id="j-1"),
        StopWorker(worker_id="w-x"),
        FetchFrames(job_id="j-1", from_seq=3),
    ]
    return [encode(f, rid=i + 1) for i, f in enumerate(valid)]


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(4)
        if op == 0 and b:
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            del b[rng.randrange(len(b)) :]
        elif op == 2:
            b.insert(rng.randrange(len(b) + 1), rng.randrange(256))
        else:
            b[rng.randrange(len(b) + 1) :] = rng.randbytes(rng.randint(0, 16))
    return bytes(b)


def shaped(rng: random.Random) -> bytes:
    """A well-formed envelope with hostile contents."""
    junk = [None, True, -1, 2**63, 1.5e308, "", "../../etc/passwd", "x" * 70_000, [], {}, b"\0"]
    body = {
        k: rng.choice(junk)
        for k in rng.sample(
            ["job_id", "model", "params", "worker_id", "from_seq", "reference", "client"], 3
        )
    }
    return msgpack.packb(
        {
            "v": rng.choice([1, 1, 1, 0, 2, "1"]),
            "t": rng.choice(list(FRAME_TYPES)),
            "r": rng.choice([0, 1, -5, 2**64 - 1]),
            "b": body,
        }
    )


def test_a_hive_survives_a_hundred_thousand_hostile_frames(
    tmp_path: Path, rbee_env: dict[str, str]
) -> None:
    rng = random.Random(SEED)
    pool = seeds()
    with hive_in_thread(tmp_path / "data") as hive:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(hive.front_endpoint)
        replies = 0
        kinds = {"random": 0, "mutated": 0, "shaped": 0, "multipart": 0}
        for i in range(FRAMES):
            kind = rng.choice(list(kinds))
            kinds[kind] += 1
            if kind == "random":
                sock.send(rng.randbytes(rng.randint(0, 64)))
            elif kind == "mutated":
                sock.send(mutate(rng, rng.choice(pool)))
            elif kind == "shaped":
                sock.send(shaped(rng))
            else:
                sock.send_multipart([rng.randbytes(4), rng.choice(pool)])
            if i % DRAIN_EVERY == 0:
                while sock.poll(0):
                    sock.recv()
                    replies += 1
        while sock.poll(500):
            sock.recv()
            replies += 1
        sock.close()
        ctx.term()
        print(
            f"sent {FRAMES} hostile frames {kinds}; {replies} answers; "
            f"{hive.front.dropped} dropped and counted by the hive"
        )
        assert sum(kinds.values()) == FRAMES and hive.front.dropped > 0
        with keeper(hive) as (client, sub):
            assert isinstance(client.request(Hello(), 5), HelloReply)
            assigned, _ = ensure(client, MODEL)
            params = GenerateParams(
                prompt="Once upon a time", max_tokens=16, temperature=0.0, raw=True, ignore_eos=True
            )
            tokens, done, _ = run_job(client, sub, assigned.worker_id, params)
            assert sum(t.count for t in tokens) == 16 and done.tokens == 16
