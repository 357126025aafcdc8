"""Process helpers shared by the modes: no process rbee starts may outlive its parent."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send ``sig`` when the parent dies (a no-op elsewhere)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a process rbee starts (a worker, an ephemeral hive).

    A PyInstaller binary points LD_LIBRARY_PATH at its bundle and keeps the original in
    LD_LIBRARY_PATH_ORIG; a child must get the person's own value back, so whatever it runs
    (itself again, or anything else) does not load the bundle's libraries by accident.
    """
    env = dict(os.environ)
    if getattr(sys, "frozen", False):
        for name in ("LD_LIBRARY_PATH", "DYLD_LIBRARY_PATH"):
            original = env.pop(f"{name}_ORIG", None)
            if original is None:
                env.pop(name, None)
            else:
                env[name] = original
    env.update(extra or {})
    return env
