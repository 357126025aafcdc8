"""Who may listen to which job's token stream.

The hive's XPUB runs in manual mode: a keeper's subscription reaches no pipe until the hive
applies it, and the hive applies one only for the exact topic of a job (``stream_topic``: the
job id and a terminator, so no topic is the prefix of another) that the subscribing key owns.
A key owns a job id by subscribing to it first (keepers subscribe before StartJob, so no token
is lost) or by starting it. An empty prefix, a partial one, or another key's job is never
applied, so no key receives a byte of another key's stream.

One gap is libzmq's: when a connection closes, XPUB reports the unsubscriptions of every topic
that connection asked for, applied or not, and without the key. A refused subscription is
therefore counted, and a keyless unsubscription uses up refused ones first: a stranger who
subscribes to someone's topic and hangs up never makes the hive think the owner went away.
"""

from __future__ import annotations

import re
from collections import Counter

from rbee.protocol.messages import ID_CHARS, ID_PATTERN, TOPIC_END

MAX_UNSTARTED_CLAIMS = 1024  # job ids subscribed to but not started yet (keepers, briefly)
MAX_REFUSED_TOPICS = 4096

_JOB_ID = re.compile(ID_PATTERN)


def job_of(topic: bytes) -> str:
    """The job id a topic names ("" for anything that is not exactly a job's topic)."""
    if not topic.endswith(TOPIC_END) or len(topic) > ID_CHARS + 1:
        return ""
    text = topic[:-1].decode("ascii", "replace")
    return text if _JOB_ID.fullmatch(text) else ""


class StreamGate:
    """Job ids → the key that owns each, and how many of its subscriptions are applied."""

    def __init__(self) -> None:
        self.owners: dict[str, str] = {}
        self.started: set[str] = set()
        self.listening: Counter[str] = Counter()
        self.refused: Counter[bytes] = Counter()

    def claim(self, job_id: str, key: str) -> bool:
        """StartJob from ``key``: whether it may use ``job_id`` (unused, or claimed by it)."""
        if self.owners.setdefault(job_id, key) != key:
            return False
        self.started.add(job_id)
        return True

    def subscribe(self, topic: bytes, key: str) -> str:
        """A subscription from ``key``: the job id to apply it for, or "" to refuse it."""
        job_id = job_of(topic)
        unstarted = len(self.owners) - len(self.started)
        if job_id and job_id not in self.owners and unstarted < MAX_UNSTARTED_CLAIMS:
            self.owners[job_id] = key
        if job_id and self.owners.get(job_id) == key:
            self.listening[job_id] += 1
            return job_id
        if job_id and (topic in self.refused or len(self.refused) < MAX_REFUSED_TOPICS):
            self.refused[topic] += 1  # only a job's topic can be mistaken for its owner's
        return ""

    def unsubscribe(self, topic: bytes, key: str | None) -> str:
        """An unsubscription (``key`` None: a connection closed). Returns the job id whose last
        listener just left ("" otherwise)."""
        job_id = job_of(topic)
        owned = job_id and self.listening[job_id] > 0 and key in (None, self.owners.get(job_id))
        if self.refused[topic] > 0 and (key is None or not owned):
            self.refused[topic] -= 1
            if not self.refused[topic]:
                del self.refused[topic]
            return ""
        if not owned:
            return ""
        self.listening[job_id] -= 1
        if self.listening[job_id]:
            return ""
        del self.listening[job_id]
        if job_id not in self.started:
            del self.owners[job_id]  # a keeper that subscribed and never started the job
        return job_id

    def listeners(self, job_id: str) -> int:
        """How many applied subscriptions the job has."""
        return self.listening.get(job_id, 0)

    def owner(self, job_id: str) -> str | None:
        """The key that owns ``job_id`` (None: nobody claimed it)."""
        return self.owners.get(job_id)

    def forget(self, job_id: str) -> None:
        """The job's record is gone; a later listener of the id is a new claim."""
        self.started.discard(job_id)
        if not self.listening.get(job_id):
            self.owners.pop(job_id, None)
