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


def pair(args: argparse.Namespace) -> int:
    """`rbee pair NODE CODE`: pin the hive's key, and have it admit this keeper's."""
    code = check_code(args.code)  # before looking for the hive: a typo fails at once
    host, port = _locate(args.node)
    known = pair_with(data_dir(), host, port + PAIR_PORT_OFFSET, code)
    print(
        safe(f"paired with {known.name} ({known.address}); its key ")
        + f"{fingerprint(known.key)} is pinned"
    )
    return ExitCode.OK


def keys_show(args: argparse.Namespace) -> int:
    """`rbee keys show`: this node's public key (what a hive admits) and its fingerprint."""
    mine = load_or_create(data_dir())
    print(f"{mine.public}\n{mine.fingerprint}")
    return ExitCode.OK


def keys_known(args: argparse.Namespace) -> int:
    """`rbee keys known`: the hives whose keys this keeper pinned."""
    rows = [["NAME", "ADDRESS", "NODE ID", "KEY"]]
    rows += [
        [k.name, k.address, k.node_id[:12], k.fingerprint] for k in KnownHives(data_dir()).entries()
    ]
    table(rows, sys.stdout)
    return ExitCode.OK


def keys_forget(args: argparse.Namespace) -> int:
    """`rbee keys forget NODE`: unpin a hive's key (pair again to trust it)."""
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


def hive_pair(args: argparse.Namespace) -> int:
    """`rbee hive pair`: print a one-time code and admit the keeper that proves it knows it."""
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
    return ExitCode.OK


def hive_authorize(args: argparse.Namespace) -> int:
    """`rbee hive authorize KEY --role R`: admit a key without pairing."""
    AuthorizedKeys(data_dir()).authorize(args.key, args.role, args.comment)
    print(f"authorized {fingerprint(args.key)} as {args.role}")
    return ExitCode.OK


def hive_revoke(args: argparse.Namespace) -> int:
    """`rbee hive revoke KEY`: a running hive refuses the key from its next request on."""
    key = AuthorizedKeys(data_dir()).revoke(args.key)
    print(f"revoked {fingerprint(key)}")
    return ExitCode.OK


def hive_keys(args: argparse.Namespace) -> int:
    """`rbee hive keys`: the keys this hive admits, with their roles."""
    rows = [["FINGERPRINT", "ROLE", "COMMENT", "KEY"]]
    roles = AuthorizedKeys(data_dir()).roles()
    rows += [[fingerprint(k), r, c, k] for k, (r, c) in roles.items()]
    table(rows, sys.stdout)
    return ExitCode.OK
