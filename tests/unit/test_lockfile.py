"""requirements.lock (the container image's dependencies) must not drift from pyproject.toml.

Every runtime dependency declared in [project].dependencies is pinned in the lock file with a version
its specifier allows, and every pin carries --hash= lines (the Dockerfile installs with
--require-hashes). No network: both files are only read. Regenerate the lock with the command in its
header when pyproject.toml's dependencies change.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements.lock"
PYPROJECT = ROOT / "pyproject.toml"

_PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;\\]+)")
_SELF = "(pyproject.toml)"  # how pip-compile's "# via" annotation names the project's own dependencies


def _entries(text: str) -> list[tuple[str, str]]:
    """(requirement, annotation) per entry of the lock file: the requirement with its `\\`
    continuation lines joined, and the indented comment lines ("# via ...") that follow it."""
    entries: list[list[str]] = []
    continued = False
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            continued = False
            continue
        if stripped.startswith("#"):
            if entries and line[:1].isspace():
                entries[-1][1] += stripped + "\n"
            continued = False
            continue
        if continued:
            entries[-1][0] += " " + stripped.rstrip("\\").strip()
        else:
            entries.append([stripped.rstrip("\\").strip(), ""])
        continued = stripped.endswith("\\")
    return [(req, via) for req, via in entries]


def _pins() -> dict[str, tuple[str, str, str]]:
    """canonical name -> (version, requirement entry, annotation) of every pin in the lock file."""
    pins: dict[str, tuple[str, str, str]] = {}
    for entry, via in _entries(LOCK.read_text(encoding="utf-8")):
        match = _PIN.match(entry)
        assert match, f"requirements.lock: not an exact `name==version` pin: {entry[:120]!r}"
        name = canonicalize_name(match.group("name"))
        assert name not in pins, f"requirements.lock pins {name} twice"
        pins[name] = (match.group("version"), entry, via)
    return pins


def _declared() -> list[Requirement]:
    with PYPROJECT.open("rb") as fh:
        project = tomllib.load(fh)["project"]
    return [Requirement(spec) for spec in project.get("dependencies", [])]


def test_lock_file_exists_and_pins_something() -> None:
    assert LOCK.is_file(), "requirements.lock is missing (see the Dockerfile)"
    assert _pins(), "requirements.lock pins nothing"


@pytest.mark.parametrize("requirement", _declared(), ids=lambda r: r.name)
def test_every_declared_dependency_is_pinned_within_its_specifier(requirement: Requirement) -> None:
    if requirement.marker is not None and not requirement.marker.evaluate():
        pytest.skip(f"{requirement}: its marker excludes this interpreter")
    pins = _pins()
    name = canonicalize_name(requirement.name)
    assert name in pins, (
        f"{requirement} is in pyproject.toml's [project].dependencies but not pinned in requirements.lock; "
        "regenerate the lock with the command in its header"
    )
    version = pins[name][0]
    assert requirement.specifier.contains(Version(version), prereleases=True), (
        f"requirements.lock pins {name}=={version}, outside pyproject.toml's {requirement}; "
        "regenerate the lock"
    )


def test_every_pin_has_a_hash() -> None:
    unhashed = [
        name
        for name, (_, entry, _via) in _pins().items()
        if not re.search(r"--hash=sha256:[0-9a-f]{64}\b", entry)
    ]
    assert not unhashed, f"pins without --hash=sha256:… in requirements.lock: {unhashed}"


def test_no_pin_is_left_over_from_a_removed_dependency() -> None:
    # pip-compile annotates the project's direct dependencies "# via neutrowatch (pyproject.toml)".
    declared = {canonicalize_name(r.name) for r in _declared()}
    direct = {name for name, (_, _entry, via) in _pins().items() if _SELF in via}
    assert direct, (
        "requirements.lock has no '# via ... (pyproject.toml)' annotations; was it made by pip-compile?"
    )
    stale = sorted(direct - declared)
    assert not stale, (
        f"requirements.lock still pins {stale} for pyproject.toml, which no longer declares them; "
        "regenerate it"
    )


def test_names_are_compared_per_pep_503() -> None:
    # pyproject's fhir.resources is the lock's fhir-resources; case, "_" and "." do not matter.
    assert canonicalize_name("fhir.resources") == canonicalize_name("FHIR_Resources") == "fhir-resources"
    assert "fhir-resources" in _pins()
