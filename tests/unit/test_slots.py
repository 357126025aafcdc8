"""The batch loop's bookkeeping, driven with the synthetic model (no llama.cpp, no sockets)."""

from __future__ import annotations

import threading
from collections import defaultdict

from rbee.protocol.codec import decode
from rbee.protocol.messages import Done, Frame, GenerateParams, RunJob, StreamError, Token
from rbee.worker.slots import Slots, SyntheticEngine, common_prefix


class Recorder:
    """Every frame each job published, in order."""

    def __init__(self) -> None:
        self.frames: dict[str, list[Frame]] = defaultdict(list)

    def __call__(self, topic: bytes, data: bytes) -> None:
        frame = decode(data).frame
        assert topic == frame.job_id.encode()  # type: ignore[attr-defined]
        self.frames[topic.decode()].append(frame)


def job(job_id: str, max_tokens: int, stop: list[str] | None = None) -> RunJob:
    params = GenerateParams(prompt="a b c", max_tokens=max_tokens, stop=stop or [])
    return RunJob(job_id=job_id, params=params)


def run_all(slots: Slots, limit: int = 10_000) -> int:
    steps = 0
    while slots.busy():
        slots.step()
        steps += 1
        assert steps < limit
    return steps


def test_jobs_share_steps_and_each_stream_is_whole() -> None:
    out = Recorder()
    slots = Slots(SyntheticEngine("synthetic:0", slots=4), out, interval_s=0)
    lengths = {"j-1": 5, "j-2": 9, "j-3": 1, "j-4": 7}
    for job_id, n in lengths.items():
        slots.admit(job(job_id, n), threading.Event())
    steps = run_all(slots)
    assert steps == 9  # the prefill step gives each its first token, then one per step each
    for job_id, n in lengths.items():
        frames = out.frames[job_id]
        tokens, end = frames[:-1], frames[-1]
        assert [f.seq for f in tokens] == list(range(n))  # type: ignore[attr-defined]
        assert "".join(f.text for f in tokens) == "".join(f" w{i}" for i in range(n))  # type: ignore[attr-defined]
        assert isinstance(end, Done) and end.seq == n and end.tokens == n
        assert end.stop_reason == "length"


def test_more_jobs_than_slots_wait_and_start_as_slots_free() -> None:
    out = Recorder()
    slots = Slots(SyntheticEngine("synthetic:0", slots=2), out, interval_s=0)
    for i in range(5):
        slots.admit(job(f"j-{i}", 3), threading.Event())
    assert slots.free() == 0 and len(slots.backlog) == 3
    run_all(slots)
    assert sorted(out.frames) == [f"j-{i}" for i in range(5)]
    assert all(isinstance(f[-1], Done) and f[-1].tokens == 3 for f in out.frames.values())


def test_a_canceled_job_ends_within_one_step_and_the_others_go_on() -> None:
    out = Recorder()
    slots = Slots(SyntheticEngine("synthetic:0", slots=3), out, interval_s=0)
    cancels = {f"j-{i}": threading.Event() for i in range(3)}
    for job_id, cancel in cancels.items():
        slots.admit(job(job_id, 20), cancel)
    for _ in range(5):
        slots.step()
    cancels["j-1"].set()
    slots.step()
    canceled = out.frames["j-1"][-1]
    assert isinstance(canceled, Done) and canceled.stop_reason == "canceled"
    assert canceled.tokens == 5  # no token after the cancel was seen
    assert slots.free() == 1
    run_all(slots)
    for job_id in ("j-0", "j-2"):
        end = out.frames[job_id][-1]
        assert isinstance(end, Done) and end.tokens == 20 and end.stop_reason == "length"


def test_stop_strings_end_one_stream() -> None:
    out = Recorder()
    slots = Slots(SyntheticEngine("synthetic:0", slots=2), out, interval_s=0)
    slots.admit(job("j-a", 50, stop=[" w3"]), threading.Event())
    slots.admit(job("j-b", 6), threading.Event())
    run_all(slots)
    a = out.frames["j-a"]
    assert "".join(f.text for f in a[:-1]) == " w0 w1 w2"  # type: ignore[attr-defined]
    assert isinstance(a[-1], Done) and a[-1].stop_reason == "stop"
    b = out.frames["j-b"][-1]
    assert isinstance(b, Done) and b.tokens == 6


def test_fail_all_ends_running_and_waiting_jobs_with_one_error_each() -> None:
    from rbee.errors import JobStopped

    out = Recorder()
    slots = Slots(SyntheticEngine("synthetic:0", slots=1), out, interval_s=0)
    slots.admit(job("j-run", 10), threading.Event())
    slots.admit(job("j-wait", 10), threading.Event())
    slots.step()
    slots.step()
    slots.fail_all(JobStopped("stopping"))
    assert not slots.busy()
    run_end, wait_end = out.frames["j-run"][-1], out.frames["j-wait"][-1]
    assert isinstance(run_end, StreamError) and run_end.seq == 2  # after its two tokens
    assert isinstance(wait_end, StreamError) and wait_end.seq == 0
    assert run_end.code == wait_end.code == "JOB_STOPPED"
    assert all(isinstance(f, Token) for f in out.frames["j-run"][:-1])


def test_common_prefix() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([1, 2], [1, 2, 3]) == 2


class CachingModel(SyntheticEngine):
    """The synthetic model with real prompt tokens, recording what each slot was told to forget."""

    def __init__(self, slots: int) -> None:
        super().__init__("synthetic:0", slots)
        self.forgot: list[tuple[int, int]] = []

    def prompt_tokens(self, params: GenerateParams) -> list[int]:
        return [ord(c) for c in params.prompt]

    def forget(self, seq: int, from_pos: int) -> bool:
        self.forgot.append((seq, from_pos))
        return True


def test_a_prompt_goes_to_the_slot_holding_its_prefix_and_computes_only_the_rest() -> None:
    model = CachingModel(slots=3)
    slots = Slots(model, Recorder(), interval_s=0)
    for job_id, prompt in (("j-a", "hello there"), ("j-b", "goodbye now")):
        slots.admit(
            RunJob(job_id=job_id, params=GenerateParams(prompt=prompt, max_tokens=2)),
            threading.Event(),
        )
    run_all(slots)
    held = {s.seq: s.cached for s in slots.slots}
    seq_b = next(seq for seq, cached in held.items() if cached[:7] == [ord(c) for c in "goodbye"])
    model.forgot.clear()
    follow_up = GenerateParams(prompt="goodbye now, and more", max_tokens=2)
    slots.admit(RunJob(job_id="j-c", params=follow_up), threading.Event())
    assert model.forgot == [(seq_b, len("goodbye now"))]  # the shared prefix stays cached
    assert slots.slots[seq_b].pending == [ord(c) for c in ", and more"]
    run_all(slots)
    model.forgot.clear()
    whole = GenerateParams(prompt="goodbye now, and more", max_tokens=2, cache_prompt=False)
    slots.admit(RunJob(job_id="j-d", params=whole), threading.Event())
    assert model.forgot == [(seq_b, 0)]  # cache_prompt false: the whole prompt is computed
    assert len(slots.slots[seq_b].pending) == len("goodbye now, and more")


def test_the_synthetic_model_paces_every_stream_from_the_first_token_on() -> None:
    """At 20 tokens/s the first token of a job comes one interval after it starts, also after
    the model sat idle, and the others follow one interval apart (shared by the streams)."""
    import time

    out = Recorder()
    model = SyntheticEngine("synthetic:20", slots=2)
    slots = Slots(model, out, interval_s=0)
    time.sleep(0.1)  # idle before the job
    started = time.perf_counter()
    slots.admit(job("j-a", 3), threading.Event())
    slots.admit(job("j-b", 3), threading.Event())
    slots.step()
    first = time.perf_counter() - started
    run_all(slots)
    total = time.perf_counter() - started
    assert 0.045 <= first < 0.1, first
    assert 0.14 <= total < 0.3, total
    assert all(isinstance(f[-1], Done) and f[-1].tokens == 3 for f in out.frames.values())


def test_tokens_within_the_stream_interval_share_a_frame() -> None:
    out = Recorder()
    slots = Slots(SyntheticEngine("synthetic:0", slots=1), out, interval_s=3600)
    slots.admit(job("j-1", 10), threading.Event())
    run_all(slots)
    first, rest, end = out.frames["j-1"]
    assert isinstance(first, Token) and (first.seq, first.count, first.text) == (0, 1, " w0")
    assert isinstance(rest, Token) and (rest.seq, rest.count, rest.token_id) == (1, 9, 9)
    assert rest.text == "".join(f" w{i}" for i in range(1, 10))
    assert isinstance(end, Done) and (end.seq, end.tokens) == (2, 10)


def test_a_long_run_of_held_text_goes_out_in_frames_of_bounded_size() -> None:
    out = Recorder()
    slots = Slots(SyntheticEngine("synthetic:0", slots=1), out, interval_s=3600)
    slots.admit(job("j-1", 600), threading.Event())
    run_all(slots)
    tokens = out.frames["j-1"][:-1]
    assert all(isinstance(f, Token) for f in tokens) and len(tokens) > 3
    assert [f.seq for f in tokens] == list(range(len(tokens)))  # type: ignore[attr-defined]
    assert all(len(f.text) < 1030 for f in tokens)  # type: ignore[attr-defined]
    assert sum(f.count for f in tokens) == 600  # type: ignore[attr-defined]
    assert "".join(f.text for f in tokens) == "".join(f" w{i}" for i in range(600))  # type: ignore[attr-defined]


def test_held_tokens_go_out_before_an_error_or_a_cancel() -> None:
    from rbee.errors import JobStopped

    out = Recorder()
    slots = Slots(SyntheticEngine("synthetic:0", slots=2), out, interval_s=3600)
    cancel = threading.Event()
    slots.admit(job("j-fail", 10), threading.Event())
    slots.admit(job("j-cancel", 10), cancel)
    for _ in range(4):
        slots.step()
    cancel.set()
    slots.step()
    slots.fail_all(JobStopped("stopping"))
    failed, canceled = out.frames["j-fail"], out.frames["j-cancel"]
    assert [f.count for f in failed[:-1]] == [1, 4]  # type: ignore[attr-defined]
    assert isinstance(failed[-1], StreamError) and failed[-1].seq == 2
    assert [f.count for f in canceled[:-1]] == [1, 3]  # type: ignore[attr-defined]
    assert isinstance(canceled[-1], Done) and canceled[-1].stop_reason == "canceled"
    assert (canceled[-1].seq, canceled[-1].tokens) == (2, 4)
