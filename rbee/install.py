"""Installing the rbee binary as a hive service, and taking it away again.

``install`` copies a PyInstaller bundle (one-dir, or a one-file binary), links the ``rbee``
command to it, writes the systemd unit and a commented settings file, and creates the data
directory. Where things go (system paths are under ``root``, normally ``/``)::

    what            system (under root)                    user (--user; $XDG_* respected)
    bundle          /opt/rbee/                             ~/.local/lib/rbee/
    command         /usr/local/bin/rbee -> bundle          ~/.local/bin/rbee -> bundle
    unit            /etc/systemd/system/rbee-hive.service  ~/.config/systemd/user/rbee-hive.service
    system user     /etc/sysusers.d/rbee.conf              (the person)
    settings        /etc/rbee/hive.env                     ~/.config/rbee/hive.env
    data (models)   /var/lib/rbee                          the CLI's own ($RBEE_DATA_DIR, else
                                                           ~/.local/share/rbee)

Install records every file and directory it created in a manifest inside the bundle, so
``uninstall`` removes exactly those (a settings file the person edited is kept) and leaves the
file tree as it found it, except the data directory, which holds the models and the catalog and
is kept unless ``remove_models``. Neither function starts or stops anything on its own unless
systemd runs this machine and ``root`` is ``/``: then it runs ``systemd-sysusers`` and
``systemctl daemon-reload`` (and, on uninstall, ``systemctl disable --now``); otherwise it lists
those commands as next steps. Tests pass a ``root`` (or a ``runner``) and nothing is run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rbee.errors import InternalError, InvalidRequest

UNIT_NAME = "rbee-hive.service"
SYSTEM_UNIT_TEMPLATE = "rbee-hive.service"
USER_UNIT_TEMPLATE = "rbee-hive.user.service"
SYSUSERS_TEMPLATE = "rbee.sysusers"
MANIFEST_NAME = "install-manifest.json"
MANIFEST_VERSION = 1
BUNDLE_CONTENTS_DIR = "_internal"  # PyInstaller ≥ 6 one-dir: the executable's libraries
SYSTEMCTL_TIMEOUT_S = 60.0
DATA_DIR_MODE = 0o750

SETTINGS_TEXT = """\
# Settings for `rbee hive` as run by systemd (rbee-hive.service). Uncomment to change;
# then `systemctl{user} restart rbee-hive`.
#
# Extra flags for `rbee hive` (see `rbee hive --help`), e.g.:
#RBEE_HIVE_ARGS=--max-workers 2 --keep-alive 10m
#RBEE_HIVE_PORT=7830
#RBEE_STREAM_PORT=7831
#RBEE_LOG_LEVEL=info
#
# Keep the hive on loopback (its default) until it accepts only authorized CURVE keys:
# `--host 0.0.0.0` would let anyone on the network use this machine.
"""

Runner = Callable[[Sequence[str]], "CommandResult"]


@dataclass(frozen=True)
class CommandResult:
    """One command the installer ran, and how it ended."""

    argv: tuple[str, ...]
    returncode: int
    output: str = ""


@dataclass
class InstallReport:
    """What install or uninstall did, what it left alone and what the person should do next."""

    action: str
    user: bool
    command: Path
    unit: Path
    data_dir: Path
    created: list[Path] = field(default_factory=list)
    removed: list[Path] = field(default_factory=list)
    kept: list[tuple[Path, str]] = field(default_factory=list)
    ran: list[CommandResult] = field(default_factory=list)
    next_steps: list[str] = field(default_factory=list)

    def text(self) -> str:
        """A short account for a person (what the CLI prints)."""
        scope = "user" if self.user else "system"
        lines = [f"rbee hive {self.action} ({scope})"]
        lines += [f"  created {p}" for p in self.created]
        lines += [f"  removed {p}" for p in self.removed]
        lines += [f"  kept    {p} ({why})" for p, why in self.kept]
        for result in self.ran:
            status = "ok" if result.returncode == 0 else f"failed ({result.returncode})"
            lines.append(f"  ran     {shlex.join(result.argv)}: {status}")
            if result.returncode != 0 and result.output:
                lines += [f"          {line}" for line in result.output.splitlines()[-5:]]
        if self.next_steps:
            lines.append("next:")
            lines += [f"  {step}" for step in self.next_steps]
        return "\n".join(lines)


@dataclass(frozen=True)
class Manifest:
    """What an install created (paths, outermost directories first) and the files it wrote
    (path → sha256), kept in the bundle so uninstall removes exactly that and nothing else."""

    created: list[Path]
    written: dict[str, str]


@dataclass(frozen=True)
class Layout:
    """Where each installed piece lives, for one mode."""

    user: bool
    bundle: Path
    command: Path
    unit: Path
    sysusers: Path | None
    settings: Path
    data_dir: Path
    cache_dir: Path | None
    data_dir_env: str | None  # written to the settings file so hive and CLI share the catalog

    @classmethod
    def for_mode(cls, user: bool, root: Path) -> Layout:
        """The paths for a system install under ``root``, or a user install in ``$HOME``."""
        if user:
            home = Path.home()
            config = _xdg("XDG_CONFIG_HOME", home / ".config")
            explicit = os.environ.get("RBEE_DATA_DIR")
            data = Path(explicit) if explicit else _xdg("XDG_DATA_HOME", home / ".local/share")
            return cls(
                user=True,
                bundle=home / ".local/lib/rbee",
                command=home / ".local/bin/rbee",
                unit=config / "systemd/user" / UNIT_NAME,
                sysusers=None,
                settings=config / "rbee/hive.env",
                data_dir=data if explicit else data / "rbee",
                cache_dir=None,
                data_dir_env=explicit,
            )
        return cls(
            user=False,
            bundle=root / "opt/rbee",
            command=root / "usr/local/bin/rbee",
            unit=root / "etc/systemd/system" / UNIT_NAME,
            sysusers=root / "etc/sysusers.d/rbee.conf",
            settings=root / "etc/rbee/hive.env",
            data_dir=root / "var/lib/rbee",
            cache_dir=root / "var/cache/rbee",
            data_dir_env=None,
        )


def install(
    binary: Path, user: bool, root: Path = Path("/"), runner: Runner | None = None
) -> InstallReport:
    """Install ``binary`` (a one-dir bundle's executable, or a one-file binary) as the hive.

    Installing again over an earlier install upgrades it: the bundle is replaced, settings the
    person edited are kept, and the manifest still names everything the first install created.
    """
    source, onedir = _check_binary(binary)
    if not user and root == Path("/") and os.geteuid() != 0:
        raise InvalidRequest(
            "a system install writes to /opt, /usr/local and /etc and needs root",
            suggestion="sudo rbee hive install, or rbee hive install --user",
        )
    layout = Layout.for_mode(user, root)
    run = _runner(root, runner)
    templates = _units_dir(source if onedir else None)
    report = InstallReport("install", user, layout.command, layout.unit, layout.data_dir)
    previous = _read_manifest(layout.bundle)
    created = list(previous.created)
    written = dict(previous.written)

    ours = _points_into(layout.command, layout.bundle)
    if not ours and (layout.command.is_symlink() or layout.command.exists()):
        raise InvalidRequest(  # checked before anything is written: a refusal changes nothing
            f"{layout.command} exists and is not rbee's link to {layout.bundle}",
            suggestion="move it away, then install again",
        )

    created += _copy_bundle(source, onedir, layout.bundle)
    created += _mkdirs(layout.command.parent)
    if ours:
        layout.command.unlink()
    layout.command.symlink_to(os.path.relpath(layout.bundle / "rbee", layout.command.parent))
    created.append(layout.command)

    unit_text = (templates / (USER_UNIT_TEMPLATE if user else SYSTEM_UNIT_TEMPLATE)).read_text()
    created += _write(layout.unit, unit_text, written)
    if layout.sysusers is not None:
        created += _write(layout.sysusers, (templates / SYSUSERS_TEMPLATE).read_text(), written)
    if layout.settings.exists():
        report.kept.append((layout.settings, "already there"))
    else:
        created += _write(layout.settings, _settings_text(layout), written)
    if not layout.data_dir.exists():
        created += _mkdirs(layout.data_dir, DATA_DIR_MODE)
    report.created = [p for p in dict.fromkeys(created) if p not in previous.created]
    _write_manifest(layout.bundle, Manifest(list(dict.fromkeys(created)), written))

    ctl = ["systemctl", "--user"] if user else ["systemctl"]
    steps: list[list[str]] = []
    if layout.sysusers is not None:
        steps.append(["systemd-sysusers", str(layout.sysusers)])
    steps.append([*ctl, "daemon-reload"])
    _run_or_suggest(steps, run, report)
    report.next_steps.append(shlex.join([*ctl, "enable", "--now", "rbee-hive"]))
    report.next_steps += _after_install_hints(layout)
    return report


def uninstall(
    user: bool, remove_models: bool, root: Path = Path("/"), runner: Runner | None = None
) -> InstallReport:
    """Stop and remove what ``install`` created; the data directory stays unless asked."""
    layout = Layout.for_mode(user, root)
    run = _runner(root, runner)
    report = InstallReport("uninstall", user, layout.command, layout.unit, layout.data_dir)
    if not user and root == Path("/") and os.geteuid() != 0:
        raise InvalidRequest("a system uninstall needs root", suggestion="sudo rbee hive uninstall")
    if not layout.bundle.exists() and not layout.unit.exists():
        raise InvalidRequest(
            f"rbee is not installed here ({layout.bundle} and {layout.unit} are absent)",
            suggestion="rbee hive uninstall --user" if not user else "sudo rbee hive uninstall",
        )
    manifest = _read_manifest(layout.bundle)
    ctl = ["systemctl", "--user"] if user else ["systemctl"]
    if run is not None and layout.unit.exists():  # stopped first: the hive drains its workers
        report.ran.append(run([*ctl, "disable", "--now", "rbee-hive"]))
    elif run is None:  # still works once the unit file is gone: the manager keeps it loaded
        report.next_steps.append(shlex.join([*ctl, "stop", "rbee-hive"]))
    for wants in layout.unit.parent.glob(f"*.wants/{UNIT_NAME}"):
        if wants.is_symlink():  # what `systemctl disable` removes, when it could not run
            _remove(wants, report)

    if _points_into(layout.command, layout.bundle):
        _remove(layout.command, report)
    for path in (layout.unit, layout.sysusers, layout.settings):
        if path is None or not path.exists():
            continue
        expected = manifest.written.get(str(path))
        if expected is not None and _sha256(path) != expected:
            report.kept.append((path, "changed since install"))
        elif expected is None and path == layout.settings:
            report.kept.append((path, "not written by install"))
        else:
            _remove(path, report)
    if layout.cache_dir is not None and layout.cache_dir.exists():
        _remove(layout.cache_dir, report)
    if layout.data_dir.exists():
        if remove_models:
            _remove(layout.data_dir, report)
        elif any(layout.data_dir.iterdir()):
            report.kept.append((layout.data_dir, "models and catalog; --remove-models deletes"))
        elif layout.data_dir in manifest.created:
            _remove(layout.data_dir, report)
    if layout.bundle.exists():
        _remove(layout.bundle, report)
    # Children sort after their parents, so reversed order empties a tree bottom-up.
    for directory in sorted((p for p in manifest.created if p not in report.removed), reverse=True):
        with contextlib.suppress(OSError):  # not empty (someone else's files) or already gone
            directory.rmdir()
            report.removed.append(directory)
    _run_or_suggest([[*ctl, "daemon-reload"]], run, report)
    if not user:
        report.next_steps.append("the system user rbee is kept (userdel rbee removes it)")
    return report


def default_binary() -> Path:
    """The binary to install when none is named: this one, if it is a PyInstaller binary."""
    if getattr(sys, "frozen", False):
        return Path(sys.executable)
    raise InvalidRequest(
        "rbee runs from source here; install a built binary",
        suggestion="packaging/build.sh, then rbee hive install --binary dist/rbee/rbee",
    )


def subprocess_runner(argv: Sequence[str]) -> CommandResult:
    """Run a command (systemctl, systemd-sysusers) and capture how it went."""
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=SYSTEMCTL_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return CommandResult(tuple(argv), 127, str(exc))
    return CommandResult(tuple(argv), done.returncode, (done.stdout + done.stderr).strip())


def _runner(root: Path, runner: Runner | None) -> Runner | None:
    """The explicit runner, else real commands only on a live systemd machine's own root."""
    if runner is not None:
        return runner
    if root == Path("/") and Path("/run/systemd/system").is_dir():
        return subprocess_runner
    return None


def _run_or_suggest(steps: list[list[str]], run: Runner | None, report: InstallReport) -> None:
    for argv in steps:
        if run is None:
            report.next_steps.append(shlex.join(argv))
        else:
            report.ran.append(run(argv))


def _check_binary(binary: Path) -> tuple[Path, bool]:
    """The executable to install and whether it is a one-dir bundle; InvalidRequest if unfit."""
    path = Path(binary).expanduser()
    if not path.is_file():
        raise InvalidRequest(
            f"no rbee binary at {path}", suggestion="packaging/build.sh builds dist/rbee/rbee"
        )
    if not os.access(path, os.X_OK):
        raise InvalidRequest(f"{path} is not executable", suggestion=f"chmod +x {path}")
    path = path.resolve()
    return path, (path.parent / BUNDLE_CONTENTS_DIR).is_dir()


def _units_dir(executable: Path | None) -> Path:
    """The unit templates: the bundle's own, this program's (frozen) or the source tree's."""
    candidates = []
    if executable is not None:
        candidates.append(executable.parent / BUNDLE_CONTENTS_DIR / "systemd")
    meipass = getattr(sys, "_MEIPASS", None)
    if meipass:
        candidates.append(Path(meipass) / "systemd")
    candidates.append(Path(__file__).resolve().parent.parent / "systemd")
    for candidate in candidates:
        if (candidate / SYSTEM_UNIT_TEMPLATE).is_file():
            return candidate
    raise InternalError(f"no systemd unit templates in {', '.join(map(str, candidates))}")


def _copy_bundle(source: Path, onedir: bool, bundle: Path) -> list[Path]:
    """Put the program at ``bundle`` (replacing an older one); returns directories created."""
    if onedir and source.parent == bundle.resolve():
        return []  # installing the installed binary again: only the units are refreshed
    created = _mkdirs(bundle.parent)
    staging = bundle.with_name(f".{bundle.name}.new")
    old = bundle.with_name(f".{bundle.name}.old")
    for leftover in (staging, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    if onedir:
        shutil.copytree(source.parent, staging, symlinks=True)
        if source.name != "rbee":
            (staging / source.name).rename(staging / "rbee")
    else:
        staging.mkdir()
        shutil.copy2(source, staging / "rbee")
    (staging / "rbee").chmod(0o755)
    if bundle.exists():
        bundle.rename(old)
    staging.rename(bundle)  # atomic: the command link never points at a half-copied bundle
    if old.exists():
        shutil.rmtree(old)
    return [*created, bundle]


def _mkdirs(path: Path, mode: int = 0o755) -> list[Path]:
    """``mkdir -p`` (``mode`` for ``path`` itself) returning what it created, outermost first."""
    missing = []
    for parent in (path, *path.parents):
        if parent.exists():
            break
        missing.append(parent)
    missing.reverse()
    for directory in missing:
        directory.mkdir()
        directory.chmod(mode if directory == path else 0o755)  # whatever the umask
    return missing


def _write(path: Path, text: str, written: dict[str, str]) -> list[Path]:
    """Write a file (creating its directories); remember its hash to spot later edits."""
    created = _mkdirs(path.parent)
    path.write_text(text)
    path.chmod(0o644)
    written[str(path)] = _sha256(path)
    return [*created, path]


def _settings_text(layout: Layout) -> str:
    text = SETTINGS_TEXT.replace("{user}", " --user" if layout.user else "")
    if layout.data_dir_env:  # the hive must use the catalog this person's CLI uses
        text += f"\nRBEE_DATA_DIR={layout.data_dir_env}\n"
    return text


def _after_install_hints(layout: Layout) -> list[str]:
    if layout.user:
        hints = ["journalctl --user -u rbee-hive -f   # the hive's log"]
        hints.append("loginctl enable-linger $USER   # keep the hive running after logout")
        if str(layout.command.parent) not in os.environ.get("PATH", "").split(os.pathsep):
            hints.append(f"add {layout.command.parent} to PATH to run `rbee`")
        return hints
    data = "/var/lib/rbee"
    return [
        "journalctl -u rbee-hive -f   # the hive's log",
        f"models for the hive live in {data} (it cannot read /home): "
        f"sudo install -D -o rbee -g rbee -m 0640 MODEL.gguf {data}/models/MODEL.gguf && "
        f"sudo -u rbee RBEE_DATA_DIR={data} rbee models import {data}/models/MODEL.gguf",
    ]


def _points_into(link: Path, bundle: Path) -> bool:
    """Whether ``link`` is a symlink to a file inside ``bundle`` (i.e. ours)."""
    if not link.is_symlink():
        return False
    target = (link.parent / os.readlink(link)).resolve(strict=False)
    return target.is_relative_to(bundle.resolve(strict=False))


def _remove(path: Path, report: InstallReport) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
    report.removed.append(path)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _xdg(name: str, default: Path) -> Path:
    value = os.environ.get(name, "")
    return Path(value) if os.path.isabs(value) else default


def _read_manifest(bundle: Path) -> Manifest:
    """The manifest of an earlier install; an empty one if there is none."""
    path = bundle / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return Manifest([], {})
    except (OSError, ValueError) as exc:
        raise InternalError(f"unreadable install manifest {path}: {exc}") from None
    try:
        if data["version"] != MANIFEST_VERSION:
            raise ValueError(f"version {data['version']}")
        created = [Path(str(p)) for p in data["created"]]
        written = {str(k): str(v) for k, v in data["written"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InternalError(f"install manifest {path} has an unknown format ({exc})") from None
    return Manifest(created, written)


def _write_manifest(bundle: Path, manifest: Manifest) -> None:
    record = {
        "version": MANIFEST_VERSION,
        "created": [str(p) for p in manifest.created],
        "written": manifest.written,
    }
    (bundle / MANIFEST_NAME).write_text(json.dumps(record, indent=2) + "\n")
