"""`rbee/install.py` on a fake bundle: install then uninstall leaves the file tree as it was.

System installs go under a temporary ``root`` and user installs into a temporary ``HOME``; the
runner records the systemctl/systemd-sysusers commands instead of running them.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from rbee.errors import InvalidRequest
from rbee.install import CommandResult, install, uninstall

REPO = Path(__file__).resolve().parents[2]


class Recorder:
    """A runner that records each command and pretends it succeeded."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    def __call__(self, argv: Sequence[str]) -> CommandResult:
        self.calls.append(tuple(argv))
        return CommandResult(tuple(argv), 0)


def tree(base: Path) -> list[tuple[str, str]]:
    """Every path under ``base`` with its kind, mode and content hash or link target."""
    entries = []
    for dirpath, dirnames, filenames in os.walk(base):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            rel = str(path.relative_to(base))
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                entries.append((rel, f"link {os.readlink(path)}"))
            elif stat.S_ISDIR(st.st_mode):
                entries.append((rel, f"dir {oct(st.st_mode & 0o7777)}"))
            else:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
                entries.append((rel, f"file {oct(st.st_mode & 0o7777)} {digest}"))
    return sorted(entries)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temporary HOME with no XDG or rbee variables pointing elsewhere."""
    home = tmp_path / "home"
    (home / ".config").mkdir(parents=True)
    (home / "notes.txt").write_text("the person's own file\n")
    monkeypatch.setenv("HOME", str(home))
    for name in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "RBEE_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    return home


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A system root that already has some of the directories an install writes into."""
    root = tmp_path / "root"
    for directory in ("etc/systemd/system", "usr/local/bin", "var/lib", "opt"):
        (root / directory).mkdir(parents=True)
    (root / "usr/local/bin/other-tool").write_text("#!/bin/sh\n")
    (root / "etc/hostname").write_text("box\n")
    return root


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    """A stand-in for PyInstaller's one-dir output (dist/rbee/rbee + dist/rbee/_internal)."""
    dist = tmp_path / "dist/rbee"
    (dist / "_internal/llama_cpp/lib").mkdir(parents=True)
    (dist / "_internal/llama_cpp/lib/libllama.so").write_bytes(b"\x7fELF fake")
    binary = dist / "rbee"
    binary.write_text('#!/bin/sh\necho rbee-fake "$@"\n')
    binary.chmod(0o755)
    return binary


def test_system_install_then_uninstall_restores_the_tree(root: Path, bundle: Path) -> None:
    before = tree(root)
    runner = Recorder()
    report = install(bundle, user=False, root=root, runner=runner)

    command = root / "usr/local/bin/rbee"
    assert command.is_symlink() and command.resolve() == root / "opt/rbee/rbee"
    out = subprocess.run([command, "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "rbee-fake --version"
    assert (root / "opt/rbee/_internal/llama_cpp/lib/libllama.so").is_file()
    unit = root / "etc/systemd/system/rbee-hive.service"
    assert unit.read_text() == (REPO / "systemd/rbee-hive.service").read_text()
    assert (root / "etc/sysusers.d/rbee.conf").read_text() == (
        REPO / "systemd/rbee.sysusers"
    ).read_text()
    assert "RBEE_HIVE_ARGS" in (root / "etc/rbee/hive.env").read_text()
    assert stat.S_IMODE((root / "var/lib/rbee").stat().st_mode) == 0o750
    assert runner.calls == [
        ("systemd-sysusers", str(root / "etc/sysusers.d/rbee.conf")),
        ("systemctl", "daemon-reload"),
    ]
    assert "systemctl enable --now rbee-hive" in report.text()
    assert root / "etc/sysusers.d" in report.created and root / "etc/systemd" not in report.created

    runner.calls.clear()
    gone = uninstall(user=False, remove_models=False, root=root, runner=runner)
    assert runner.calls == [
        ("systemctl", "disable", "--now", "rbee-hive"),
        ("systemctl", "daemon-reload"),
    ]
    assert tree(root) == before, gone.text()


def test_models_are_kept_unless_asked(root: Path, bundle: Path) -> None:
    before = tree(root)
    install(bundle, user=False, root=root, runner=Recorder())
    data = root / "var/lib/rbee"
    (data / "models").mkdir()
    (data / "models/tiny.gguf").write_bytes(b"GGUF model bytes")
    (data / "catalog.db").write_bytes(b"sqlite")

    kept = uninstall(user=False, remove_models=False, root=root, runner=Recorder())
    assert (data / "models/tiny.gguf").read_bytes() == b"GGUF model bytes"
    assert [p for p, _ in kept.kept] == [data]
    after = [entry for entry in tree(root) if not entry[0].startswith("var/lib/rbee")]
    assert after == before, "everything but the data directory is gone"

    install(bundle, user=False, root=root, runner=Recorder())  # a later install finds them
    assert (data / "catalog.db").exists()
    uninstall(user=False, remove_models=True, root=root, runner=Recorder())
    assert tree(root) == before


def test_user_install_then_uninstall_restores_home(home: Path, bundle: Path) -> None:
    before = tree(home)
    report = install(bundle, user=True, root=Path("/nonexistent-root"), runner=Recorder())
    assert (home / ".local/bin/rbee").resolve() == home / ".local/lib/rbee/rbee"
    unit = home / ".config/systemd/user/rbee-hive.service"
    assert unit.read_text() == (REPO / "systemd/rbee-hive.user.service").read_text()
    assert (home / ".local/share/rbee").is_dir()
    assert "systemctl --user enable --now rbee-hive" in report.text()
    assert not Path("/nonexistent-root").exists()

    uninstall(user=True, remove_models=False, root=Path("/nonexistent-root"), runner=Recorder())
    assert tree(home) == before


def test_user_install_keeps_the_persons_catalog(home: Path, bundle: Path) -> None:
    data = home / ".local/share/rbee"
    data.mkdir(parents=True)
    (data / "catalog.db").write_bytes(b"sqlite")
    before = tree(home)
    install(bundle, user=True, runner=Recorder())
    uninstall(user=True, remove_models=False, runner=Recorder())
    assert tree(home) == before
    install(bundle, user=True, runner=Recorder())
    uninstall(user=True, remove_models=True, runner=Recorder())
    assert not data.exists()


def test_reinstall_upgrades_and_edited_settings_survive(root: Path, bundle: Path) -> None:
    before = tree(root)
    install(bundle, user=False, root=root, runner=Recorder())
    settings = root / "etc/rbee/hive.env"
    settings.write_text(settings.read_text() + "RBEE_HIVE_ARGS=--max-workers 2\n")
    bundle.write_text("#!/bin/sh\necho rbee-v2\n")
    again = install(bundle, user=False, root=root, runner=Recorder())
    assert (settings, "already there") in again.kept
    assert "rbee-v2" in (root / "opt/rbee/rbee").read_text()
    assert not list((root / "opt").glob(".rbee.*")), "no staging leftovers"

    gone = uninstall(user=False, remove_models=False, root=root, runner=Recorder())
    assert (settings, "changed since install") in gone.kept
    settings.unlink()
    (root / "etc/rbee").rmdir()
    assert tree(root) == before


def test_one_file_binary(root: Path, tmp_path: Path) -> None:
    binary = tmp_path / "rbee-onefile"
    binary.write_text("#!/bin/sh\necho onefile\n")
    binary.chmod(0o755)
    before = tree(root)
    install(binary, user=False, root=root, runner=Recorder())
    assert sorted(p.name for p in (root / "opt/rbee").iterdir()) == [
        "install-manifest.json",
        "rbee",
    ]
    uninstall(user=False, remove_models=False, root=root, runner=Recorder())
    assert tree(root) == before


def test_nothing_runs_without_systemd_or_off_the_real_root(root: Path, bundle: Path) -> None:
    report = install(bundle, user=False, root=root)  # no runner: root is not "/"
    assert report.ran == []
    assert f"systemd-sysusers {root}/etc/sysusers.d/rbee.conf" in report.next_steps
    assert "systemctl daemon-reload" in report.next_steps
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir()
    (wants / "rbee-hive.service").symlink_to("../rbee-hive.service")  # as `enable` leaves it
    gone = uninstall(user=False, remove_models=True, root=root)
    assert gone.ran == [] and gone.next_steps[0] == "systemctl stop rbee-hive"
    assert not (wants / "rbee-hive.service").is_symlink(), "disabled, though systemctl never ran"


def test_bad_input_is_refused_without_changes(root: Path, bundle: Path, tmp_path: Path) -> None:
    before = tree(root)
    with pytest.raises(InvalidRequest, match="no rbee binary"):
        install(tmp_path / "absent", user=False, root=root)
    not_exec = tmp_path / "plain"
    not_exec.write_text("data")
    with pytest.raises(InvalidRequest, match="not executable"):
        install(not_exec, user=False, root=root)
    (root / "usr/local/bin/rbee").write_text("#!/bin/sh\necho someone else's rbee\n")
    with pytest.raises(InvalidRequest, match="is not rbee's link"):
        install(bundle, user=False, root=root)
    (root / "usr/local/bin/rbee").unlink()
    assert tree(root) == before
    with pytest.raises(InvalidRequest, match="not installed"):
        uninstall(user=False, remove_models=False, root=root)
