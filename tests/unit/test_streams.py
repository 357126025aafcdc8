"""The hive's stream gate: who may listen to which job (rbee.hive.streams)."""

from __future__ import annotations

from rbee.hive.streams import MAX_UNSTARTED_CLAIMS, StreamGate, job_of
from rbee.protocol.messages import stream_topic


def test_only_exact_job_topics_name_a_job() -> None:
    assert job_of(stream_topic("j-1")) == "j-1"
    for topic in (b"", b"j", b"j-1", b"j-", b"/", b"../x/", b"j-1/x/", b"a" * 80 + b"/"):
        assert job_of(topic) == "", topic


def test_the_first_key_owns_a_job_and_no_other_key_listens() -> None:
    gate = StreamGate()
    assert gate.subscribe(stream_topic("j-1"), "A") == "j-1"  # before StartJob, as keepers do
    assert gate.claim("j-1", "A") and not gate.claim("j-1", "B")
    assert gate.subscribe(stream_topic("j-1"), "B") == ""
    assert gate.subscribe(b"", "B") == "" and gate.subscribe(b"j-", "B") == ""
    assert gate.claim("j-2", "B") and gate.subscribe(stream_topic("j-2"), "A") == ""
    assert gate.listeners("j-1") == 1 and gate.listeners("j-2") == 0


def test_a_stranger_hanging_up_never_looks_like_the_owner_leaving() -> None:
    gate = StreamGate()
    topic = stream_topic("j-1")
    gate.claim("j-1", "A")
    gate.subscribe(topic, "A")
    gate.subscribe(topic, "B")  # refused, but libzmq reports its unsubscription on hang-up
    assert gate.unsubscribe(topic, None) == ""  # B hung up (no key on such unsubscriptions)
    assert gate.listeners("j-1") == 1
    assert gate.unsubscribe(topic, "B") == ""  # an explicit one from B: not A's either
    assert gate.unsubscribe(topic, None) == "j-1"  # A hung up: its job may be canceled
    assert gate.listeners("j-1") == 0


def test_claims_that_never_start_are_bounded_and_released() -> None:
    gate = StreamGate()
    for i in range(MAX_UNSTARTED_CLAIMS):
        assert gate.subscribe(stream_topic(f"j-{i}"), "A")
    assert gate.subscribe(stream_topic("j-more"), "A") == ""
    assert gate.unsubscribe(stream_topic("j-0"), None) == "j-0"
    assert gate.owner("j-0") is None and gate.subscribe(stream_topic("j-more"), "A") == "j-more"
    gate.claim("j-more", "A")
    gate.forget("j-more")
    assert gate.owner("j-more") == "A"  # still listened to: kept until its keeper leaves
