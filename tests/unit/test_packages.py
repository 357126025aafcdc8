"""Every folder of rbee's code is a regular package: the binary's build collects rbee's modules
with PyInstaller's collect_submodules, which does not look inside namespace packages, and the
CLI imports most verbs by name when they run, which no import analysis can follow."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import rbee
from rbee import cli

ROOT = Path(rbee.__file__).parent


def test_every_folder_with_modules_has_an_init() -> None:
    folders = {p.parent for p in ROOT.rglob("*.py")}
    missing = sorted(str(f.relative_to(ROOT)) for f in folders if not (f / "__init__.py").exists())
    assert missing == [], f"namespace packages the binary would leave out: {missing}"


def test_every_module_the_cli_imports_by_name_is_found_by_a_package_walk() -> None:
    walked = {m.name for m in pkgutil.walk_packages(rbee.__path__, "rbee.")}
    named = {
        getattr(cli, n)
        for n in dir(cli)
        if n.isupper() and str(getattr(cli, n)).startswith("rbee.")
    }
    assert named, "the CLI names no modules: the test looks in the wrong place"
    assert named <= walked, sorted(named - walked)
    for module in named:
        importlib.import_module(module)
