"""The gateway reads a job's tokens on its event loop (rbee.gateway.relay), with real sockets.

A PUB socket stands in for the hive's stream, a real StreamSubscriber and JobStream are the
job's, and a real asyncio loop runs on a thread of its own, as the gateway's does. Each case
checks what the loop delivered, what it handed back to the job's thread, and from where that
thread's JobStream goes on.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import zmq

from rbee.gateway.relay import LoopReader
from rbee.keeper.job import JobEvent, Text
from rbee.keeper.stream import IDLE_CHECK_S, JobStream
from rbee.protocol.codec import encode
from rbee.protocol.messages import Done, Frame, Token, stream_topic
from rbee.transport.sockets import StreamSubscriber, bind_endpoint, new_socket

JOB = "j-relay-0001"


@contextmanager
def stream() -> Iterator[tuple[zmq.Socket[bytes], StreamSubscriber, asyncio.AbstractEventLoop]]:
    """A bound PUB, a SUB subscribed to JOB and connected to it, and a running event loop."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pub = new_socket(ctx, zmq.PUB)
    endpoint = bind_endpoint(pub, "127.0.0.1", 0)
    sub = StreamSubscriber(ctx, endpoint, 1000)
    sub.subscribe(JOB)
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, name="loop", daemon=True)
    runner.start()
    try:
        deadline = time.monotonic() + 5
        while True:  # PUB/SUB drops what it sends before the subscription arrives
            pub.send_multipart([stream_topic(JOB), b"probe"])
            if sub.sock.poll(50):
                sub.sock.recv_multipart()
                break
            assert time.monotonic() < deadline, "the subscription never arrived"
        while sub.sock.poll(50):  # probes still on their way
            sub.sock.recv_multipart()
        yield pub, sub, loop
    finally:
        loop.call_soon_threadsafe(loop.stop)
        runner.join(5)
        loop.close()
        sub.close()
        pub.close(0)
        ctx.term()


def send(pub: zmq.Socket[bytes], frame: Frame) -> None:
    pub.send_multipart([stream_topic(JOB), encode(frame)])


def token(seq: int, text: str) -> Token:
    return Token(job_id=JOB, seq=seq, text=text, token_id=seq)


def done(seq: int) -> Done:
    return Done(
        job_id=JOB, seq=seq, tokens=seq, prompt_tokens=1, ttft_s=0, decode_s=0, stop_reason="eos"
    )


def lend(
    sub: StreamSubscriber, loop: asyncio.AbstractEventLoop, stop: threading.Event | None = None
) -> tuple[LoopReader, JobStream, list[JobEvent], threading.Thread, list[object]]:
    """Start lending on a thread (as the job's thread does); its result lands in ``result``."""
    job_stream = JobStream(client=None, sub=sub, job_id=JOB)  # type: ignore[arg-type]
    events: list[JobEvent] = []
    reader = LoopReader(loop, sub, job_stream, events.append)
    result: list[object] = []
    thread = threading.Thread(
        target=lambda: result.append(reader.run(stop or threading.Event(), 0.05)), name="job"
    )
    thread.start()
    return reader, job_stream, events, thread, result


def test_in_order_tokens_go_to_the_loop_and_the_terminal_frame_back_to_the_thread() -> None:
    with stream() as (pub, sub, loop):
        for seq, text in enumerate(["Hel", "", "lo"]):  # an empty token: held back, no event
            send(pub, token(seq, text))
        reader, job_stream, events, thread, result = lend(sub, loop)
        time.sleep(0.2)  # the first frames came before the loop looked: they are read anyway
        send(pub, token(3, "!"))
        send(pub, done(4))
        thread.join(5)
        assert result == [done(4)] and reader.last == done(4)
        assert events == [Text("Hel"), Text("lo"), Text("!")]
        assert job_stream.next_seq == 5 and not job_stream.fetch_first


def test_a_gap_hands_the_stream_back_to_fetch_from_the_missing_frame() -> None:
    with stream() as (pub, sub, loop):
        _, job_stream, events, thread, result = lend(sub, loop)
        send(pub, token(0, "a"))
        send(pub, token(1, "b"))
        send(pub, token(3, "d"))  # seq 2 was lost
        thread.join(5)
        assert result == [None] and events == [Text("a"), Text("b")]
        assert job_stream.next_seq == 2 and job_stream.fetch_first  # the thread asks at once


def test_a_silence_hands_the_stream_back_and_a_stop_gives_it_back_at_once() -> None:
    with stream() as (_pub, sub, loop):
        started = time.monotonic()
        _, job_stream, events, thread, result = lend(sub, loop)
        thread.join(5)
        assert result == [None] and not events and job_stream.fetch_first
        assert IDLE_CHECK_S <= time.monotonic() - started < IDLE_CHECK_S + 1
        stop = threading.Event()
        _, job_stream, _, thread, result = lend(sub, loop, stop)
        started = time.monotonic()
        stop.set()
        thread.join(5)
        assert result == [None] and not job_stream.fetch_first  # stopped: nothing to fetch
        assert time.monotonic() - started < 0.5
