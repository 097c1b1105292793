"""The lock (requirements/cpu.lock) pins every package of `.[cpu,dev]`, each at a version that
pyproject.toml allows, and `make setup` installs with it: two installs of one commit are one
environment. `make lock` refreshes it."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements" / "cpu.lock"


def _pins() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for number, line in enumerate(LOCK.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep and version.strip(), f"{LOCK.name}:{number}: {line!r} is not pinned with =="
        key = canonicalize_name(name)
        assert key not in pins, f"{LOCK.name}:{number}: {name} pinned twice"
        pins[key] = Version(version.strip())
    return pins


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return [Requirement(r) for r in [*project["dependencies"], *extras["cpu"], *extras["dev"]]]


def test_the_lock_pins_every_dependency_at_a_version_pyproject_allows():
    pins = _pins()
    for req in _requirements():
        key = canonicalize_name(req.name)
        assert key in pins, f"{req.name} (pyproject.toml) is not in {LOCK.name}: run `make lock`"
        assert req.specifier.contains(pins[key], prereleases=True), (
            f"{LOCK.name} pins {req.name}=={pins[key]}, outside pyproject.toml's {req.specifier}: run `make lock`")
    for tool in ("pip", "setuptools"):  # the installer is part of the environment too
        assert tool in pins, f"{LOCK.name} does not pin {tool}"


def test_make_setup_installs_with_the_lock():
    makefile = (ROOT / "Makefile").read_text()
    assert "LOCK := requirements/cpu.lock" in makefile
    assert "$(call install,$(VENV),-c $(LOCK))" in makefile
