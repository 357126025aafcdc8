"""`rbee top` without sockets: rates from successive surveys, the error log, sorting, and both
renderings (plain text and the terminal screen)."""

from __future__ import annotations

import io

from rich.console import Console

from rbee.keeper import top
from rbee.keeper.survey import HiveView
from rbee.protocol.messages import PROTOCOL_VERSION, HelloReply, HiveStatus, JobError, WorkerInfo

GB = 1_000_000_000


def worker(worker_id: str, jobs: int, busy: int = 0, rss: int = GB, model: str = "m") -> WorkerInfo:
    return WorkerInfo(
        worker_id=worker_id,
        model=model,
        backend="cpu",
        device="cpu",
        pid=4242,
        state="busy" if busy else "idle",
        last_activity=100.0,
        rss_bytes=rss,
        jobs_served=jobs,
        tokens_generated=jobs * 10,  # ten tokens a job
        slots=4,
        slots_busy=busy,
    )


def hive(name: str, *workers: WorkerInfo, free: int = 8 * GB) -> HiveView:
    hello = HelloReply(
        node=name,
        rbee_version="0.1.0",
        protocol_version=PROTOCOL_VERSION,
        pid=1,
        stream_port=7831,
        status="ok",
    )
    status = HiveStatus(
        node=name,
        rbee_version="0.1.0",
        protocol_version=PROTOCOL_VERSION,
        workers=list(workers),
        cpu_count=8,
        ram_total_bytes=16 * GB,
        ram_free_bytes=free,
        disk_free_bytes=0,
        queue_length=2,
    )
    return HiveView("10.0.0.1", 7830, "mdns", hello=hello, status=status)


def unreachable(name: str) -> HiveView:
    return HiveView(name, 7830, "seed", error="nothing listens on its port")


def test_tokens_per_second_come_from_successive_counters_over_a_window() -> None:
    tracker = top.Tracker(window_s=10.0)
    first = tracker.update([hive("a", worker("w-1", 5))], mono=0.0, wall=1000.0, took_s=0.1)
    assert first.workers[0].tokens_per_s is None  # one sample: no rate yet
    second = tracker.update([hive("a", worker("w-1", 9))], mono=2.0, wall=1002.0, took_s=0.1)
    assert second.workers[0].tokens_per_s == 20.0
    assert second.nodes[0].tokens_per_s == 20.0
    for t in range(4, 22, 2):  # no new jobs: the window forgets the burst
        later = tracker.update([hive("a", worker("w-1", 9))], mono=t, wall=1000.0 + t, took_s=0.1)
    assert later.workers[0].tokens_per_s == 0.0


def test_a_counter_that_goes_back_starts_the_rate_again() -> None:
    tracker = top.Tracker()
    tracker.update([hive("a", worker("w-1", 50))], mono=0.0, wall=0.0, took_s=0.1)
    again = tracker.update([hive("a", worker("w-1", 1))], mono=2.0, wall=2.0, took_s=0.1)
    assert again.workers[0].tokens_per_s is None


def test_errors_are_logged_once_with_a_count_and_gone_hives_are_noted() -> None:
    tracker = top.Tracker()
    tracker.update([hive("a"), unreachable("b")], mono=0.0, wall=3600.0, took_s=0.1)
    snap = tracker.update([hive("a"), unreachable("b")], mono=2.0, wall=3602.0, took_s=0.1)
    assert [(e.node, e.count) for e in snap.errors] == [("b:7830", 2)]
    assert (snap.errors[0].first, snap.errors[0].last) == (3600.0, 3602.0)
    snap = tracker.update([unreachable("b")], mono=4.0, wall=3604.0, took_s=0.1)
    assert snap.errors[0].node == "a"
    assert "no longer in reach" in snap.errors[0].message
    assert "b:7830 ×3: nothing listens on its port" in top.error_lines(snap.errors)[1]


def test_sorting_by_each_column() -> None:
    tracker = top.Tracker()
    views = [
        hive("alpha", worker("w-a", 0, busy=1, rss=3 * GB, model="zeta"), free=15 * GB),
        hive("beta", worker("w-b", 0, busy=3, rss=1 * GB, model="eta"), free=1 * GB),
    ]
    snap = tracker.update(views, mono=0.0, wall=0.0, took_s=0.1)
    order = {s: [w.worker_id for w in top.sort_rows(snap, s)[1]] for s in top.SORTS}
    assert order["node"] == ["w-a", "w-b"]
    assert order["model"] == ["w-b", "w-a"]
    assert order["slots"] == ["w-b", "w-a"]
    assert order["memory"] == ["w-a", "w-b"]
    assert [n.name for n in top.sort_rows(snap, "memory")[0]] == ["beta", "alpha"]


def test_plain_output_has_every_section_and_no_escape_codes() -> None:
    tracker = top.Tracker()
    hostile = hive("evil\x1b]0;pwned\x07", worker("w-1", 3))
    snap = tracker.update([hostile, unreachable("b")], mono=0.0, wall=0.0, took_s=0.1)
    text = top.plain(snap, 2.0)
    assert "\x1b" not in text and "\x07" not in text
    assert "evil\\x1b]0;pwned\\x07" in text
    lines = text.splitlines()
    assert lines[0].startswith("rbee top · 2 hives, 1 worker")
    assert lines[1].split()[:4] == ["NODE", "ADDRESS", "STATE", "WORKERS"]
    assert any(line.split()[:5] == ["NODE", "WORKER", "MODEL", "STATE", "SLOTS"] for line in lines)
    assert "last errors:" in lines


def test_the_screen_marks_the_sort_column_and_shows_names_as_text() -> None:
    snap = top.Tracker().update([hive("[bold]a", worker("w-1", 3))], mono=0.0, wall=0.0, took_s=0.1)
    out = io.StringIO()
    console = Console(file=out, width=160, force_terminal=False, color_system=None)
    console.print(top.screen(snap, 2.0, "model"))
    text = out.getvalue()
    assert "sort: model" in text and "MODEL▼" in text and "NODE▼" not in text
    assert "[bold]a" in text  # a node name is never markup
    console.print(top.screen(None, 2.0, "node"))
    assert "surveying" in out.getvalue()


def test_failed_jobs_a_hive_reports_are_listed_once_at_their_own_time() -> None:
    tracker = top.Tracker()
    view = hive("a")
    assert view.status is not None
    failed = JobError(at=3590.0, model="m", code="INVALID_REQUEST", message="prompt too long")
    view.status.errors.append(failed)
    tracker.update([view], mono=0.0, wall=3600.0, took_s=0.1)
    snap = tracker.update([view, unreachable("b")], mono=2.0, wall=3602.0, took_s=0.1)
    assert [(e.node, e.count, e.last) for e in snap.errors] == [
        ("b:7830", 1, 3602.0),
        ("a", 1, 3590.0),  # once, though two refreshes saw it
    ]
    assert "INVALID_REQUEST (m): prompt too long" in top.error_lines(snap.errors)[1]
