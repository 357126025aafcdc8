"""The built binary for the packaging tests: ``$RBEE_BINARY``, else packaging/build.sh's output.

build.sh caches everything (the portable llama-cpp-python wheel, the build venv, the bundle
itself while rbee's sources are unchanged), so calling it once per session costs seconds after
the first build. ``RBEE_SKIP_BINARY=1`` skips the binary tests instead of building.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUILD_TIMEOUT_S = 3000  # a cold build compiles llama.cpp (~6-15 min on 2 busy cores)


@pytest.fixture(scope="session")
def rbee_binary() -> Path:
    """Path of the one-dir rbee executable to test."""
    explicit = os.environ.get("RBEE_BINARY")
    if explicit:
        path = Path(explicit).resolve()
        if not (path.is_file() and os.access(path, os.X_OK)):
            pytest.fail(f"RBEE_BINARY={explicit} is not an executable file")
        return path
    if os.environ.get("RBEE_SKIP_BINARY") == "1":
        pytest.skip("RBEE_SKIP_BINARY=1: not building the PyInstaller binary")
    env = {k: v for k, v in os.environ.items() if k != "RBEE_ONEFILE"}
    done = subprocess.run(
        [str(REPO / "packaging/build.sh")],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
        env=env,
    )
    if done.returncode != 0:
        pytest.fail(f"packaging/build.sh failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return Path(done.stdout.strip().splitlines()[-1])
