"""Which hive a request goes to: the one named, else the best one in reach, else an ephemeral one.

``--node`` may be a discovered node name or HOST[:PORT]. Without it the keeper surveys the LAN
(mDNS, seeds, this machine's port), lets ``choose`` pick and says why. A model that only this
machine can run (``file:``, ``synthetic:``) or that no hive in reach holds goes to this machine's
hive, or to an ephemeral hive started for the one request.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time

import zmq

from rbee.errors import AccessDenied, HiveKeyChanged, RbeeError
from rbee.keeper.choose import FREE_SLOT, choose
from rbee.keeper.link import (
    HELLO_TIMEOUTS_S,
    EphemeralHive,
    HiveLink,
    check_version,
    hello,
    open_link,
)
from rbee.keeper.survey import HiveView, local_view, survey
from rbee.paths import data_dir
from rbee.protocol.messages import FILE_PREFIX, SYNTHETIC_PREFIX

INFER_BROWSE_S = 0.8  # the longest a request waits for LAN answers when none come
LAN_MEMORY = "lan.json"  # what the last survey found, in the data directory


def connect(
    ctx: zmq.Context[zmq.Socket[bytes]],
    node: str | None,
    model: str,
    backend: str = "auto",
    device: str = "",
    preload: bool = True,
) -> HiveLink:
    """Open a link to the hive that should run ``model``; its notes say which and why.

    The connections that asked hives Hello and Status stay open, and the chosen one carries
    the request: no second handshake, and the status tells whether a worker has a free slot.
    With no hive on this machine, and none on the LAN the last time this machine looked, an
    ephemeral hive starts at once (loading ``model``'s worker if ``preload`` and the hive is to
    place it) while the LAN is surveyed; it is stopped again if a hive there is the better
    choice.
    """
    preloaded = model if preload and backend == "auto" and not device else ""
    if node:
        return open_named(ctx, node)
    here = local_view(ctx)
    local_only = model.startswith((FILE_PREFIX, SYNTHETIC_PREFIX))  # only this machine runs these
    spare = None
    if here is None and (local_only or not lan_had_hives()):
        spare = EphemeralHive(preload=preloaded)
    views: list[HiveView] = []
    try:
        if local_only:
            if here is not None:
                return _here(ctx, here, "the model is a local file")
            assert spare is not None  # started above: nothing else can run this model
            ephemeral, spare = spare, None
            return ephemeral.link(ctx)
        warm = choose([here.candidate()], model, backend, device) if here else None
        if here is not None and warm is not None and warm.reason.startswith(FREE_SLOT):
            return _here(ctx, here, warm.reason)  # nothing beats a warm worker on this machine
        views = survey(ctx, browse_s=INFER_BROWSE_S, keep=True, local=here)
        remember_lan(views)
        notes = [_clone_warning(v) for v in views if v.cloned_id]
        notes += [
            f"skipping {v.name}: {v.error}"
            for v in views
            if v.hello is None and v.source != "local"
        ]
        choice = choose([v.candidate() for v in views], model, backend, device)
        if choice is not None:
            view = next(v for v in views if v.endpoint == choice.candidate.endpoint)
            link = _open(ctx, view)
            link.notes = [*notes, f"chose {view.name} ({view.endpoint}): {choice.reason}"]
            return link
        if here is not None:
            link = _here(ctx, here, "no hive in reach holds the model")
        else:
            ephemeral, spare = spare or EphemeralHive(preload=preloaded), None
            link = ephemeral.link(ctx)
        link.notes = notes + link.notes
        return link
    finally:
        for unused in [here, *views]:
            if unused is not None:
                unused.close()  # the chosen view's connection now belongs to the link
        if spare is not None:  # started for nothing: let it go without waiting for it
            threading.Thread(target=spare.stop, name="spare-hive", daemon=True).start()


def lan_had_hives() -> bool:
    """Whether this machine's last survey found a hive elsewhere (a keeper that never looked
    assumes not: most first runs are on one machine)."""
    try:
        seen = json.loads((data_dir() / LAN_MEMORY).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(seen, dict) and bool(seen.get("hives"))


def remember_lan(views: list[HiveView]) -> None:
    """Note how many hives elsewhere answered (best effort: a read-only data dir is fine)."""
    others = sum(1 for v in views if v.source != "local" and v.hello is not None)
    path = data_dir() / LAN_MEMORY
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"hives": others, "at": round(time.time())}))
        tmp.replace(path)


def _here(ctx: zmq.Context[zmq.Socket[bytes]], view: HiveView, why: str) -> HiveLink:
    link = _open(ctx, view)
    link.notes = [f"using the hive running here: {why}"]
    return link


def _open(ctx: zmq.Context[zmq.Socket[bytes]], view: HiveView) -> HiveLink:
    """A link over the view's open connection if it has one (taken from it), else a new one."""
    if view.client is not None and view.hello is not None:
        check_version(view.hello)
        client, view.client = view.client, None
        return HiveLink(ctx, client, view.host, view.hello, status=view.status)
    client, reply = hello(ctx, view.host, view.port, HELLO_TIMEOUTS_S, view.curve)
    return HiveLink(ctx, client, view.host, reply)


def open_named(ctx: zmq.Context[zmq.Socket[bytes]], node: str) -> HiveLink:
    """``--node``: a discovered node name (exact), else HOST[:PORT]."""
    if ":" not in node and not node.replace(".", "").isdigit():
        # A name two announcements claim goes to the one reached with its pinned key, never to
        # whichever answered first (an impostor can announce any name).
        found = survey(ctx, browse_s=2.0, include_local=False)
        named = sorted((v for v in found if v.name == node), key=lambda v: v.hello is None)
        refused = ("HIVE_KEY_CHANGED", "NOT_PAIRED", "ACCESS_DENIED")
        if named and named[0].hello is None and named[0].error_code in refused:
            raise _refusal(named[0])
        if named:
            return _open(ctx, named[0])
    return open_link(ctx, node)


def _refusal(view: HiveView) -> RbeeError:
    if view.error_code == "HIVE_KEY_CHANGED":
        return HiveKeyChanged(view.error, suggestion=f"`rbee keys forget {view.name}`, then pair")
    if view.error_code == "ACCESS_DENIED":
        return AccessDenied(f"{view.name} at {view.endpoint} {view.error}")
    return AccessDenied(
        f"this keeper has not paired with {view.name}",
        suggestion=f"on {view.name}: `rbee hive pair`; here: `rbee pair {view.name} CODE`",
    )


def _clone_warning(view: HiveView) -> str:
    nid = view.announcement.node_id if view.announcement else "?"
    return (
        f"warning: {view.name} at {view.endpoint} announces node id {nid[:8]}… which another "
        "hive uses too (a cloned machine?): delete its data directory's node_id file"
    )
