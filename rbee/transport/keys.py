"""CURVE keys: this node's key pair, the keys a hive admits, and the hive keys a keeper trusts.

All three live in ``<data dir>/keys/``:

* ``node.key``: this node's Curve25519 key pair (z85), created on first use with mode 0600. A
  private key that others can read is refused, not silently used.
* ``authorized_keys`` (a hive's): ``KEY ROLE COMMENT`` per line; ROLE is ``infer`` (run
  inference, list), ``hive`` (a peer hive: also borrow this hive's memory for a model's layers)
  or ``admin`` (all of that, and pull, remove, stop workers).
* ``known_hives`` (a keeper's): ``NODE_ID KEY ADDRESS NAME`` per line, pinned on first trust
  like SSH's known_hosts; a hive whose key changed is refused with HIVE_KEY_CHANGED.

Logs and messages show fingerprints, never private keys.
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import zmq
from zmq.utils import z85

from rbee.errors import AccessDenied, HiveKeyChanged, InvalidRequest

ROLES = ("infer", "admin", "hive")
KEY_FILE = "node.key"
Z85_KEY_CHARS = 40


@dataclass(frozen=True)
class KeyPair:
    """A Curve25519 key pair, z85-encoded."""

    public: str
    secret: str

    @property
    def fingerprint(self) -> str:
        """A short, readable digest of the public key."""
        return fingerprint(self.public)


def fingerprint(public: str) -> str:
    """``SHA256:`` and the first 16 base64 characters of the key's sha256."""
    digest = hashlib.sha256(z85.decode(public.encode())).digest()
    return "SHA256:" + base64.b64encode(digest).decode()[:16]


def check_key(text: str) -> str:
    """A z85 public key, validated; InvalidRequest otherwise."""
    key = text.strip()
    if len(key) != Z85_KEY_CHARS:
        raise InvalidRequest(f"a CURVE public key has {Z85_KEY_CHARS} characters (got {len(key)})")
    try:
        z85.decode(key.encode())
    except (ValueError, KeyError):
        raise InvalidRequest("not a z85-encoded CURVE public key") from None
    return key


def keys_dir(data_dir: Path) -> Path:
    """The keys directory (0700)."""
    path = data_dir / "keys"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def load_or_create(data_dir: Path) -> KeyPair:
    """This node's key pair, made on first use; a key file others can read is refused."""
    path = keys_dir(data_dir) / KEY_FILE
    if not path.exists():
        public, secret = zmq.curve_keypair()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"public {public.decode()}\nsecret {secret.decode()}\n")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise AccessDenied(
            f"the private key {path} is readable by others (mode {mode:o})",
            suggestion=f"chmod 600 {path}, or delete it to make a new key (then pair again)",
        )
    fields = dict(line.split(None, 1) for line in path.read_text().splitlines() if line.strip())
    try:
        return KeyPair(public=check_key(fields["public"]), secret=fields["secret"].strip())
    except (KeyError, InvalidRequest):
        raise AccessDenied(
            f"the key file {path} is damaged", suggestion="delete it to make a new key"
        ) from None


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class AuthorizedKeys:
    """The keys a hive admits and their roles; re-read when the file changes."""

    def __init__(self, data_dir: Path) -> None:
        self.path = keys_dir(data_dir) / "authorized_keys"
        self._stamp: tuple[int, int] | None = None
        self._roles: dict[str, tuple[str, str]] = {}

    def roles(self) -> dict[str, tuple[str, str]]:
        """key → (role, comment), fresh from disk."""
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            self._stamp, self._roles = None, {}
            return self._roles
        if stamp != self._stamp:
            roles = {}
            for line in self.path.read_text().splitlines():
                parts = line.split(None, 2)
                if len(parts) >= 2 and parts[1] in ROLES and len(parts[0]) == Z85_KEY_CHARS:
                    roles[parts[0]] = (parts[1], parts[2] if len(parts) > 2 else "")
            self._stamp, self._roles = stamp, roles
        return self._roles

    def role(self, key: str) -> str:
        """The role of ``key``, or "" if it is not authorized."""
        entry = self.roles().get(key)
        return entry[0] if entry else ""

    def authorize(self, key: str, role: str, comment: str = "") -> None:
        """Admit ``key`` with ``role`` (replacing its old role)."""
        key = check_key(key)
        if role not in ROLES:
            raise InvalidRequest(f"role must be one of {', '.join(ROLES)} (got {role!r})")
        roles = dict(self.roles())
        roles[key] = (role, " ".join(comment.split()))
        self._save(roles)

    def revoke(self, key_or_fingerprint: str) -> str:
        """Remove a key (given whole or by fingerprint); returns the key removed."""
        roles = dict(self.roles())
        match = [k for k in roles if key_or_fingerprint in (k, fingerprint(k))]
        if not match:
            raise InvalidRequest(f"no authorized key matches {key_or_fingerprint!r}")
        del roles[match[0]]
        self._save(roles)
        return match[0]

    def _save(self, roles: dict[str, tuple[str, str]]) -> None:
        _write_private(
            self.path, "".join(f"{k} {r} {c}".rstrip() + "\n" for k, (r, c) in roles.items())
        )


@dataclass(frozen=True)
class KnownHive:
    """A hive this keeper trusts."""

    node_id: str
    key: str
    address: str
    name: str

    @property
    def fingerprint(self) -> str:
        """The pinned key's fingerprint."""
        return fingerprint(self.key)


class KnownHives:
    """The hive keys this keeper pinned (by node id, and by address for --node)."""

    def __init__(self, data_dir: Path) -> None:
        self.path = keys_dir(data_dir) / "known_hives"

    def entries(self) -> list[KnownHive]:
        """Every pinned hive."""
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 4:
                out.append(KnownHive(*parts))
        return out

    def find(self, node_id: str = "", address: str = "") -> KnownHive | None:
        """The pinned hive with this node id (preferred) or address."""
        entries = self.entries()
        by_id = [e for e in entries if node_id and e.node_id == node_id]
        by_address = [e for e in entries if address and e.address == address]
        found = by_id or by_address
        return found[0] if found else None

    def check(self, node_id: str, key: str, address: str, name: str) -> KnownHive | None:
        """The pinned entry for an announced hive; HiveKeyChanged if its key differs."""
        known = self.find(node_id=node_id)
        if known is not None and known.key != key:
            raise HiveKeyChanged(
                f"hive {name} ({address}) presents key {fingerprint(key)}, but "
                f"{known.fingerprint} was pinned for it",
                suggestion=f"if the hive was reinstalled: `rbee keys forget {name}` and pair "
                "again; otherwise someone may be impersonating it",
            )
        return known

    def pin(self, hive: KnownHive) -> None:
        """Trust ``hive`` (replacing an entry with its node id or address)."""
        kept = [
            e for e in self.entries() if e.node_id != hive.node_id and e.address != hive.address
        ]
        lines = [f"{e.node_id} {e.key} {e.address} {e.name}\n" for e in [*kept, hive]]
        _write_private(self.path, "".join(lines))

    def forget(self, name_or_address: str) -> list[KnownHive]:
        """Drop pinned hives by name, node id or address; returns what was dropped."""
        entries = self.entries()
        gone = [e for e in entries if name_or_address in (e.name, e.node_id, e.address)]
        if gone:
            kept = [e for e in entries if e not in gone]
            _write_private(
                self.path, "".join(f"{e.node_id} {e.key} {e.address} {e.name}\n" for e in kept)
            )
        return gone
