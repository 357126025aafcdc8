"""A lender that hangs, told apart from one that computes and from a borrower that is idle."""

from __future__ import annotations

from rbee.hive.stall import LinkState, StallWatch

STALL_S = 10.0


def link(
    cpu_s: float = 5.0, bytes_in: int = 1000, awaited: bool = True, name: str = "beta"
) -> LinkState:
    return LinkState(name, cpu_s, bytes_in, awaited)


def run(watch: StallWatch, steps: list[tuple[float, bool, float, list[LinkState]]]) -> list[str]:
    return [watch.check("w-1", busy, cpu, links, now)[0] for now, busy, cpu, links in steps]


def test_nothing_moving_while_a_job_runs_is_a_stall_after_stall_s_and_not_before() -> None:
    watch = StallWatch(STALL_S)
    said = run(watch, [(t, True, 2.0, [link()]) for t in (0.0, 5.0, 9.9, 10.1)])
    assert said[:3] == ["", "", ""]
    assert "stopped making progress" in said[3] and "10 s" in said[3]


def test_an_idle_borrower_never_stalls_however_long() -> None:
    watch = StallWatch(STALL_S)
    assert run(watch, [(t, False, 2.0, [link()]) for t in (0.0, 100.0, 10_000.0)]) == ["", "", ""]
    # and the clock starts when a job does, not at the last byte before the idle hours
    assert run(watch, [(10_001.0, True, 2.0, [link()]), (10_005.0, True, 2.0, [link()])]) == [
        "",
        "",
    ]


def test_bytes_back_or_cpu_time_on_either_side_is_progress() -> None:
    for moving in (
        lambda t: (2.0, link(bytes_in=1000 + int(t))),  # bytes come back
        lambda t: (2.0, link(cpu_s=5.0 + t)),  # the lender computes (a long GPU step)
        lambda t: (2.0 + t, link()),  # the worker computes its own layers (a long prompt)
    ):
        watch = StallWatch(STALL_S)
        steps = []
        for t in range(0, 60, 2):
            cpu, state = moving(float(t))
            steps.append((float(t), True, cpu, [state]))
        assert set(run(watch, steps)) == {""}


def test_background_threads_cpu_time_is_not_progress() -> None:
    watch = StallWatch(STALL_S)
    steps = [(float(t), True, 2.0 + 0.001 * t, [link(cpu_s=5.0 + 0.002 * t)]) for t in range(11)]
    assert run(watch, steps)[-1] != ""


def test_the_lender_waited_on_is_blamed_else_every_lender() -> None:
    watch = StallWatch(STALL_S)
    links = [link(name="beta", awaited=False), link(name="gamma", awaited=True)]
    watch.check("w-1", True, 2.0, links, 0.0)
    assert watch.check("w-1", True, 2.0, links, 11.0)[1] == ["gamma"]
    links = [link(name="beta", awaited=False), link(name="gamma", awaited=False)]
    watch.check("w-1", True, 2.0, links, 20.0)
    assert watch.check("w-1", True, 2.0, links, 31.0)[1] == ["beta", "gamma"]
