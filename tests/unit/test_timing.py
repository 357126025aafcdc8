"""The timing contracts between rbee's processes, side by side.

Each constant lives in the module that owns it; a contract between two of them (one process
waits, another must speak first) is written here once, with why it must hold, so changing one
side of it fails a test instead of a user's request.
"""

from __future__ import annotations

import re
from pathlib import Path

from rbee.gateway import jobs as gateway_jobs
from rbee.hive import jobs as hive_jobs
from rbee.hive import pool, provision, pulls, server, settings, supervisor
from rbee.keeper import job as keeper_job
from rbee.keeper import models as keeper_models
from rbee.worker import main as worker_main

ROOT = Path(__file__).resolve().parents[2]


def test_a_waiting_keeper_hears_from_its_hive_before_its_wait_ends() -> None:
    """A keeper waiting for a worker gives up after WAIT_TIMEOUT_S of silence, so everything the
    hive says while the keeper waits comes sooner, even from a loop held up for a second."""
    late = server.POLL_INTERVAL_S + pool.LOOP_HELD_UP_S
    for cadence in (
        provision.LOAD_PROGRESS_EVERY_S,
        hive_jobs.QUEUE_TOLD_EVERY_S,
        pulls.DOWNLOAD_PROGRESS_EVERY_S,
    ):
        assert cadence + late < keeper_job.WAIT_TIMEOUT_S


def test_the_hive_explains_a_missing_subscription_before_the_keeper_times_out() -> None:
    """A job whose keeper never subscribed fails on the hive with a message saying so; the
    keeper must still be listening then, or it would see a bare TIMEOUT instead."""
    assert hive_jobs.SUBSCRIBE_TIMEOUT_S + server.POLL_INTERVAL_S < keeper_job.WAIT_TIMEOUT_S


def test_models_pull_hears_a_download_before_its_wait_ends() -> None:
    assert pulls.DOWNLOAD_PROGRESS_EVERY_S + pool.LOOP_HELD_UP_S < keeper_models.PULL_WAIT_S


def test_a_missed_heartbeat_is_not_a_dead_worker() -> None:
    """The hive declares a worker dead after HEARTBEAT_TIMEOUT_S of silence: that is several
    beats, so one late beat (a long prompt evaluation, a busy machine) kills nothing."""
    assert pool.HEARTBEAT_TIMEOUT_S >= 3 * worker_main.HEARTBEAT_INTERVAL_S + pool.LOOP_HELD_UP_S


def test_a_stopped_gateway_job_is_joined_after_its_cancel_is_answered() -> None:
    """`rbee serve` stopping waits for each job's thread: long enough for the job to notice
    (STOP_CHECK_S) and for its Cancel to be answered or to time out."""
    needed = keeper_job.STOP_CHECK_S + keeper_job.CANCEL_TIMEOUT_S
    assert needed < gateway_jobs.JOIN_TIMEOUT_S


def test_a_draining_hive_stops_before_systemd_kills_it() -> None:
    """On SIGTERM the hive lets jobs run for its drain grace, then asks each worker to stop,
    signals it and finally kills it; all of that fits in the unit's TimeoutStopSec, so systemd
    never SIGKILLs a hive that still has workers to reap."""
    drain = settings.DRAIN_GRACE_S + pool.STOP_GRACE_S + supervisor.TERM_GRACE_S
    for unit in sorted((ROOT / "systemd").glob("*.service")):
        found = re.search(r"^TimeoutStopSec=(\d+)$", unit.read_text(), re.MULTILINE)
        assert found, f"{unit.name} states no TimeoutStopSec"
        assert drain + pool.LOOP_HELD_UP_S < int(found.group(1)), unit.name
