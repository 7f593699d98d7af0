"""Generate fhir_profiles/input/fsh/terminology.fsh from the service's own code.

The grades come from service/core/grading.py BUILT_IN, the events from
service/core/episodes.py EventKind, the Flag codes and Provenance activities from
service/output/alerts.py, all through service/output/profiles.py; so the published codes cannot drift from
what the service writes (build.sh regenerates the file, build.sh --check fails when it is stale).

    python fhir_profiles/tools/terminology.py            # print
    python fhir_profiles/tools/terminology.py --write    # write input/fsh/terminology.fsh
    python fhir_profiles/tools/terminology.py --check    # exit 1 when the file differs
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from service.core.episodes import EventKind  # noqa: E402 - after the sys.path line above
from service.core.grading import BUILT_IN  # noqa: E402 - after the sys.path line above
from service.output import alerts, profiles  # noqa: E402 - after the sys.path line above

TARGET = ROOT / "fhir_profiles" / "input" / "fsh" / "terminology.fsh"


def _q(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _decimal(value: float) -> str:
    return f"{value:g}" if "e" not in f"{value:g}" else repr(value)


def _grades(add: Callable[[str], None]) -> None:
    """The grade CodeSystem and ValueSet."""
    # -- grades ---------------------------------------------------------------------------------
    add("CodeSystem: NeutrowatchGradeCS")
    add(f"Id: {profiles.GRADE_SYSTEM}")
    add('Title: "Neutropenia grades"')
    add(
        "Description: "
        + _q(
            "The grades of neutrowatch's grading schemes, each by the scheme's own label, under the "
            "severity the service maps it to (is-a): mild, moderate, severe, or normal. ANC in cells/uL."
        )
    )
    add("* ^caseSensitive = true")
    add("* ^hierarchyMeaning = #is-a")
    add("* ^content = #complete")
    props = [
        ("scheme", "code", "The grading scheme (CodeSystem neutrowatch-grading-scheme) the grade belongs to"),
        ("rank", "integer", "Order within the scheme: 0 not neutropenic, larger is worse"),
        ("upper-bound", "decimal", "Exclusive upper bound of the grade's ANC, cells/uL"),
        (
            "upper-bound-is-lln",
            "boolean",
            "The upper bound is the result's lower limit of normal (referenceRange.low)",
        ),
    ]
    for i, (code, kind, description) in enumerate(props):
        index = "0" if i == 0 else "+"
        add(f"* ^property[{index}].code = #{code}")
        add(f"* ^property[=].type = #{kind}")
        add(f"* ^property[=].description = {_q(description)}")
    concepts = list(profiles.grade_concepts())
    for severity in ("mild", "moderate", "severe", None):
        parent = profiles.severity_code(severity)
        add(f"* #{parent} {_q(profiles.SEVERITY_DISPLAY[severity])}")
        for c in (c for c in concepts if c.severity == parent):
            add(f"* #{parent} #{c.code} {_q(c.display)} {_q(c.definition)}")
            add(f"* #{parent} #{c.code} ^property[0].code = #scheme")
            add(f"* #{parent} #{c.code} ^property[=].valueCode = #{c.scheme}")
            add(f"* #{parent} #{c.code} ^property[+].code = #rank")
            add(f"* #{parent} #{c.code} ^property[=].valueInteger = {c.rank}")
            if c.below is not None:
                add(f"* #{parent} #{c.code} ^property[+].code = #upper-bound")
                add(f"* #{parent} #{c.code} ^property[=].valueDecimal = {_decimal(c.below)}")
            if c.below_lln:
                add(f"* #{parent} #{c.code} ^property[+].code = #upper-bound-is-lln")
                add(f"* #{parent} #{c.code} ^property[=].valueBoolean = true")
    add("")
    add("ValueSet: NeutrowatchGradeVS")
    add(f"Id: {profiles.GRADE_SYSTEM}")
    add('Title: "Neutropenia grades of the grading schemes"')
    add(
        "Description: "
        + _q("Every grade of every built-in grading scheme (the severities themselves are not grades).")
    )
    for c in concepts:
        add(f"* NeutrowatchGradeCS#{c.code}")
    add("")


def _schemes(add: Callable[[str], None]) -> None:
    """The grading-scheme CodeSystem and ValueSet."""
    # -- schemes --------------------------------------------------------------------------------
    add("CodeSystem: NeutrowatchGradingSchemeCS")
    add(f"Id: {profiles.SCHEME_SYSTEM}")
    add('Title: "Neutropenia grading schemes"')
    add("Description: " + _q("The grading schemes neutrowatch can apply (config grading.scheme)."))
    add("* ^caseSensitive = true")
    add("* ^content = #complete")
    for scheme in BUILT_IN.values():
        add(
            f"* #{scheme.name} {_q(profiles.SCHEME_DISPLAY[scheme.name])} "
            f"{_q(profiles.scheme_definition(scheme))}"
        )
    add("")
    add("ValueSet: NeutrowatchGradingSchemeVS")
    add(f"Id: {profiles.SCHEME_SYSTEM}")
    add('Title: "Neutropenia grading schemes"')
    add("Description: " + _q("All grading schemes of neutrowatch."))
    for scheme in BUILT_IN.values():
        add(f"* NeutrowatchGradingSchemeCS#{scheme.name}")
    add("")


def _events(add: Callable[[str], None]) -> None:
    """The alert-event CodeSystem and ValueSet."""
    # -- events ---------------------------------------------------------------------------------
    add("CodeSystem: NeutrowatchAlertEventCS")
    add(f"Id: {profiles.EVENT_SYSTEM}")
    add('Title: "Neutropenia alert events"')
    add(
        "Description: "
        + _q("What an alert announces about a neutropenia episode (the `event` of the decision records).")
    )
    add("* ^caseSensitive = true")
    add("* ^content = #complete")
    for kind in EventKind:
        display, definition = profiles.EVENT_DISPLAY[kind]
        add(f"* #{kind.value} {_q(display)} {_q(definition)}")
    add("")
    add("ValueSet: NeutrowatchAlertEventVS")
    add(f"Id: {profiles.EVENT_SYSTEM}")
    add('Title: "Neutropenia alert events"')
    add("Description: " + _q("All alert events of neutrowatch."))
    for kind in EventKind:
        add(f"* NeutrowatchAlertEventCS#{kind.value}")
    add("")


def _bound_codes(add: Callable[[str], None]) -> None:
    """ValueSets of codes of other systems the profiles bind."""
    # -- codes of other systems the profiles bind ----------------------------------------------
    add("ValueSet: NeutrowatchFlagCode")
    add("Id: neutrowatch-flag-code")
    add('Title: "Neutropenia Flag codes"')
    add(
        "Description: "
        + _q(
            "Flag.code of a neutrowatch Flag: neutropenia, or febrile neutropenia once the episode is "
            "febrile."
        )
    )
    for coding in (alerts.NEUTROPENIA, alerts.FEBRILE_NEUTROPENIA):
        add(f"* {coding['system']}#{coding['code']} {_q(coding['display'])}")
    add("")
    add("ValueSet: NeutrowatchProvenanceActivity")
    add("Id: neutrowatch-provenance-activity")
    add('Title: "neutrowatch Provenance activities"')
    add(
        "Description: "
        + _q("Provenance.activity of a neutrowatch alert write: the Flag created (a new episode) or updated.")
    )
    for coding in alerts.ACTIVITY.values():
        add(f"* {coding['system']}#{coding['code']} {_q(coding['display'])}")


def fsh() -> str:
    out: list[str] = [
        "// GENERATED by fhir_profiles/tools/terminology.py from service/output/profiles.py",
        "// (grading.BUILT_IN, episodes.EventKind, alerts.py). Do not edit: run fhir_profiles/build.sh.",
        "",
    ]
    add = out.append

    _grades(add)
    _schemes(add)
    _events(add)
    _bound_codes(add)
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help=f"write {TARGET.relative_to(ROOT)}")
    mode.add_argument(
        "--check", action="store_true", help="exit 1 when the file is not what the service says"
    )
    args = p.parse_args(argv)
    text = fsh()
    if args.write:
        TARGET.write_text(text)
    elif args.check:
        if not TARGET.exists() or TARGET.read_text() != text:
            print(f"{TARGET.relative_to(ROOT)} is stale: run fhir_profiles/build.sh", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
