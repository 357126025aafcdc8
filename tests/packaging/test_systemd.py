"""The systemd units and the sysusers file, checked by systemd's own tools.

`systemd-analyze verify` needs the ExecStart binary to exist, so each unit is checked as a copy
whose ExecStart names a stub; everything else is the file as shipped. These tests need the
`systemd` package (systemd-analyze, systemd-sysusers), not a running systemd.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "systemd"
SYSTEM_EXEC = "/usr/local/bin/rbee"
USER_EXEC = "%h/.local/bin/rbee"
MAX_SYSTEM_EXPOSURE = 2.0  # systemd-analyze security: 1.6 now; anything above means a regression

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (apt-get install -y systemd)",
)


def analyze(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run systemd-analyze with a runtime directory of its own (the user manager needs one)."""
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime), "SYSTEMD_LOG_COLOR": "0"}
    return subprocess.run(
        ["systemd-analyze", *args], capture_output=True, text=True, timeout=120, env=env
    )


def unit_copy(tmp_path: Path, template: str, exec_path: str) -> Path:
    """The unit as shipped, under its installed name, with ExecStart pointing at a stub."""
    stub = tmp_path / "bin/rbee"
    stub.parent.mkdir(exist_ok=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    text = (UNITS / template).read_text()
    assert f"ExecStart={exec_path} hive" in text
    unit = tmp_path / "units" / "rbee-hive.service"
    unit.parent.mkdir(exist_ok=True)
    unit.write_text(text.replace(f"ExecStart={exec_path}", f"ExecStart={stub}"))
    return unit


@pytest.mark.parametrize(
    ("template", "exec_path", "scope"),
    [
        ("rbee-hive.service", SYSTEM_EXEC, "--system"),
        ("rbee-hive.user.service", USER_EXEC, "--user"),
    ],
)
def test_units_verify_without_warnings(
    tmp_path: Path, template: str, exec_path: str, scope: str
) -> None:
    unit = unit_copy(tmp_path, template, exec_path)
    result = analyze(scope, "verify", str(unit), tmp_path=tmp_path)
    output = result.stdout + result.stderr
    about_unit = [line for line in output.splitlines() if "rbee" in line or unit.name in line]
    assert result.returncode == 0, output
    assert about_unit == [], output


def test_system_unit_security_exposure(tmp_path: Path) -> None:
    unit = unit_copy(tmp_path, "rbee-hive.service", SYSTEM_EXEC)
    result = analyze("security", "--offline=true", str(unit), tmp_path=tmp_path)
    if result.returncode != 0 and "offline" in result.stderr:
        pytest.skip(f"this systemd-analyze has no --offline: {result.stderr.strip()}")
    match = re.search(r"Overall exposure level for rbee-hive\.service: ([\d.]+)", result.stdout)
    assert match is not None, result.stdout + result.stderr
    assert float(match.group(1)) <= MAX_SYSTEM_EXPOSURE, result.stdout


def test_system_unit_drains_and_sandboxes() -> None:
    """The settings the hive's shutdown and the install layout rely on (not a style check)."""
    settings = {}
    for line in (UNITS / "rbee-hive.service").read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            settings.setdefault(key, value)
    assert settings["User"] == "rbee" and "DynamicUser" not in settings
    assert settings["StateDirectory"] == "rbee"
    assert settings["Environment"] == "RBEE_DATA_DIR=/var/lib/rbee"
    assert (settings["KillMode"], settings["KillSignal"]) == ("mixed", "SIGTERM")
    assert int(settings["TimeoutStopSec"]) >= 10 + 3 + 5, "drain grace + worker TERM grace"
    assert settings["Restart"] == "on-failure" and settings["CapabilityBoundingSet"] == ""
    assert "--host" not in settings["ExecStart"], "a LAN-facing hive needs CURVE keys first"


def test_sysusers_creates_the_rbee_system_user(tmp_path: Path) -> None:
    if shutil.which("systemd-sysusers") is None:
        pytest.skip("systemd-sysusers is not installed")
    (tmp_path / "etc").mkdir()
    result = subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", str(UNITS / "rbee.sysusers")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    passwd = (tmp_path / "etc/passwd").read_text()
    match = re.search(r"^rbee:x:(\d+):(\d+):[^:]*:/var/lib/rbee:/usr/sbin/nologin$", passwd, re.M)
    assert match is not None, passwd
    assert int(match.group(1)) < 1000, "a system user"
    assert re.search(rf"^rbee:x:{match.group(2)}:", (tmp_path / "etc/group").read_text(), re.M)
