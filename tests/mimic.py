"""The MIMIC-IV demo CBC extract (tests/data/mimic-iv-demo-cbc/, ODbL 1.0, attribution in its README)
as a site would send it after mapping its local codes: each Observation keeps its MIMIC coding and
gains the LOINC coding of ITEM_TO_LOINC, and its unit becomes the UCUM code (UCUM_UNIT).

The mapping follows the terms service/core/codes.py monitors (reference §1) and the traits of the
source recorded in its README: item 51256 "Neutrophils" is the neutrophil % of the differential
(770-8), 51144 "Bands" the band % of a manual differential (764-1), 52075 the reported ANC (751-8);
51218 "Granulocyte Count" is NOT an ANC and stays unmapped (so the service ignores it), as do the
items it does not monitor (lymphocytes, monocytes, ...).
"""

from __future__ import annotations

import copy
import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DATA = Path(__file__).parent / "data" / "mimic-iv-demo-cbc"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"

# MIMIC itemid -> (LOINC code, LOINC display); LOINC terms from service/core/codes.py.
ITEM_TO_LOINC: dict[str, tuple[str, str]] = {
    "51301": ("6690-2", "Leukocytes [#/volume] in Blood by Automated count"),
    "51256": ("770-8", "Neutrophils/100 leukocytes in Blood by Automated count"),
    "51144": ("764-1", "Band form neutrophils/100 leukocytes in Blood by Manual count"),
    "52075": ("751-8", "Neutrophils [#/volume] in Blood by Automated count"),
    "51222": ("718-7", "Hemoglobin [Mass/volume] in Blood"),
    "51265": ("777-3", "Platelets [#/volume] in Blood by Automated count"),
    "223761": ("8310-5", "Body temperature"),
    "223762": ("8310-5", "Body temperature"),
}

# MIMIC unit string -> UCUM code ("K" is kelvin in UCUM: K/uL is 10*3/uL).
UCUM_UNIT: dict[str, str] = {
    "K/uL": "10*3/uL",
    "%": "%",
    "#/uL": "/uL",
    "g/dL": "g/dL",
    "°F": "[degF]",
    "°C": "Cel",
}


def with_loinc(resource: dict[str, Any]) -> dict[str, Any]:
    """The Observation with a LOINC coding added (when its item is mapped) and its unit as UCUM."""
    out = copy.deepcopy(resource)
    codings = out.get("code", {}).get("coding", [])
    mapped = ITEM_TO_LOINC.get(codings[0].get("code", "")) if codings else None
    if mapped is not None:
        codings.append({"system": LOINC, "code": mapped[0], "display": mapped[1]})
    quantity = out.get("valueQuantity")
    if quantity is not None and quantity.get("unit") in UCUM_UNIT:
        quantity.update({"system": UCUM, "code": UCUM_UNIT[quantity["unit"]]})
    return out


def resources(data: Path = DATA) -> Iterator[dict[str, Any]]:
    """The Patients, then every Observation with its LOINC coding (with_loinc)."""
    with (data / "Patient.ndjson").open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)
    with gzip.open(data / "Observation.ndjson.gz", "rt", encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield with_loinc(json.loads(line))


def write_ndjson(path: Path, data: Path = DATA) -> Path:
    """The mapped extract as one NDJSON file (replay's input)."""
    with path.open("w", encoding="utf-8") as out:
        for r in resources(data):
            out.write(json.dumps(r, separators=(",", ":")) + "\n")
    return path
