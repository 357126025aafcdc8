"""`rbee explain MODEL`: where a request for a model would run, and why.

Every hive in reach (or the one ``--node`` names) is asked where it would put the model now: a
worker of it with a free slot, else the placement a new worker would get (one GPU, several,
part GPU and part CPU, or the CPU: rbee.hive.fit) with each option's arithmetic, needed against
free. Then the keeper's own pick among the hives, with its reason (rbee.keeper.choose), as
`rbee infer` would make it.
"""

from __future__ import annotations

import sys
from typing import TextIO

import zmq

from rbee.errors import ProtocolError, RbeeError
from rbee.keeper.choose import choose
from rbee.keeper.connect import open_named
from rbee.keeper.nodes import NODES_BROWSE_S, REQUEST_TIMEOUT_S
from rbee.keeper.survey import survey
from rbee.protocol.messages import Explain, Explanation
from rbee.terminal import safe
from rbee.transport.sockets import DealerClient


def explain(
    model: str, node: str | None, backend: str, device: str, out: TextIO = sys.stdout
) -> None:
    """Print each hive's answer, then the hive `rbee infer` would choose."""
    ask = Explain(model=model, backend=backend, device=device)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        if node:
            link = open_named(ctx, node)
            try:
                out.write(render(_ask(link.client, ask), link.hello.node))
            finally:
                link.close()
            return
        views = survey(ctx, browse_s=NODES_BROWSE_S, keep=True)
        try:
            for view in views:
                if view.client is None:
                    out.write(f"{safe(view.name)}: not asked ({safe(view.error)})\n\n")
                    continue
                try:
                    out.write(render(_ask(view.client, ask), view.name))
                except RbeeError as exc:
                    out.write(f"{safe(view.name)}: {safe(exc.message)}\n\n")
            picked = choose([v.candidate() for v in views], model, backend, device)
        finally:
            for view in views:
                view.close()
        if not views:
            out.write(
                "no hive in reach: `rbee infer` would start one on this machine for the request"
                " (`rbee hive` keeps one running; then ask again)\n"
            )
        elif picked is None:
            out.write(f"rbee infer: no hive in reach can serve {safe(model)}\n")
        else:
            out.write(
                f"rbee infer would use {safe(picked.candidate.name)}: {safe(picked.reason)}\n"
            )
    finally:
        ctx.destroy(linger=0)


def _ask(client: DealerClient, ask: Explain) -> Explanation:
    reply = client.request(ask, REQUEST_TIMEOUT_S)
    if not isinstance(reply, Explanation):
        raise ProtocolError(f"the hive answered Explain with {reply.TYPE}")
    return reply


def render(e: Explanation, name: str) -> str:
    """One hive's answer, as a person reads it."""
    lines = [f"{safe(name)}: {safe(e.model)}"]
    if e.warm:
        lines.append(f"  now: {safe(e.warm)} (a running worker comes first)")
    if e.chosen:
        lines.append(f"  a new worker would run on {safe(e.chosen)}")
    else:
        lines.append("  a new worker fits nowhere here")
    lines.append(f"  estimate: {safe(e.estimate)}")
    for o in e.options:
        mark = "yes" if o.fits else "no "
        slots = f", {o.slots} slot{'s' if o.slots != 1 else ''}" if o.fits else ""
        lines.append(f"  {mark} {o.kind:<7} {safe(o.label)}{slots}: {safe(o.why)}")
    return "\n".join(lines) + "\n\n"
