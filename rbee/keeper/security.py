"""The key commands: `rbee keys …`, `rbee pair`, and `rbee hive pair|authorize|revoke|keys`.

They work on files in the data directory (the hive's, for `rbee hive …`: run them as the hive's
user with its RBEE_DATA_DIR), so they need no running daemon: a running hive re-reads its
authorized keys whenever the file changes.
"""

from __future__ import annotations

import argparse
import socket
import sys

import zmq

from rbee.discovery import node_id
from rbee.errors import ExitCode
from rbee.keeper.link import parse_node
from rbee.keeper.nodes import table
from rbee.keeper.survey import survey
from rbee.pairing import (
    PAIR_PORT_OFFSET,
    HiveIdentity,
    check_code,
    new_code,
    pair_with,
    serve_pairing,
)
from rbee.paths import data_dir
from rbee.terminal import safe
from rbee.transport.keys import AuthorizedKeys, KnownHives, fingerprint, load_or_create


def keeper_command(args: argparse.Namespace) -> int:
    """`rbee pair NODE CODE` and `rbee keys show|known|forget`."""
    if args.command == "pair":
        code = check_code(args.code)  # before looking for the hive: a typo fails at once
        host, port = _locate(args.node)
        known = pair_with(data_dir(), host, port + PAIR_PORT_OFFSET, code)
        print(
            safe(f"paired with {known.name} ({known.address}); its key ")
            + f"{fingerprint(known.key)} is pinned"
        )
        return ExitCode.OK
    if args.keys_command == "show":
        mine = load_or_create(data_dir())
        print(f"{mine.public}\n{mine.fingerprint}")
    elif args.keys_command == "known":
        rows = [["NAME", "ADDRESS", "NODE ID", "KEY"]]
        rows += [
            [k.name, k.address, k.node_id[:12], k.fingerprint]
            for k in KnownHives(data_dir()).entries()
        ]
        table(rows, sys.stdout)
    else:
        gone = KnownHives(data_dir()).forget(args.node)
        names = safe(", ".join(k.name for k in gone)) or "none"
        print(f"forgot {len(gone)} hive key(s): {names}")
    return ExitCode.OK


def _locate(node: str) -> tuple[str, int]:
    """A discovered node's address, else HOST[:PORT]."""
    if ":" not in node and not node.replace(".", "").isdigit():
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        try:
            named = [v for v in survey(ctx, browse_s=2.0, include_local=False) if v.name == node]
        finally:
            ctx.destroy(linger=0)
        if named:
            return named[0].host, named[0].port
    return parse_node(node)


def hive_command(args: argparse.Namespace) -> int:
    """`rbee hive pair|authorize|revoke|keys`, on this machine's hive files."""
    authorized = AuthorizedKeys(data_dir())
    if args.hive_command == "pair":
        code = new_code()
        port = args.port + PAIR_PORT_OFFSET
        me = HiveIdentity(args.node_name or socket.gethostname(), node_id(data_dir()), args.port)
        print(
            f"pairing code: {code}   (valid {args.timeout:.0f} s, role {args.role})\n"
            f"on the keeper's machine run:  rbee pair {me.node} {code}",
            flush=True,
        )
        key = serve_pairing(data_dir(), args.host, port, code, args.role, me, args.timeout)
        print(f"paired: {fingerprint(key)} may now {args.role}")
    elif args.hive_command == "authorize":
        authorized.authorize(args.key, args.role, args.comment)
        print(f"authorized {fingerprint(args.key)} as {args.role}")
    elif args.hive_command == "revoke":
        key = authorized.revoke(args.key)
        print(f"revoked {fingerprint(key)}")
    else:
        rows = [["FINGERPRINT", "ROLE", "COMMENT", "KEY"]]
        rows += [[fingerprint(k), r, c, k] for k, (r, c) in authorized.roles().items()]
        table(rows, sys.stdout)
    return ExitCode.OK
