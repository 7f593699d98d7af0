"""The MIMIC-IV demo CBC extract (tests/data/mimic-iv-demo-cbc/, ODbL 1.0, attribution in its README),
read two ways:

- as the site sends it, with MIMIC's local item codes and unit strings (`read_observations`,
  `OBSERVATIONS`), to be read through the project's ConceptMap (`CONCEPT_MAP`) and `units_config()`;
- as a LOINC-coding site would send it (`with_loinc`, `resources`, `write_ndjson`): each Observation
  keeps its MIMIC coding and gains the LOINC coding of its item, its unit the UCUM code.

The LOINC codes are written here once, independently of the ConceptMap (a test of the map must not
read its expectations from the map); each from loinc.org, the terms service/core/codes.py monitors
(docs/clinical-reference.md §1). Item 51256 "Neutrophils" is the neutrophil % of the differential
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

import orjson

DATA = Path(__file__).parent / "data" / "mimic-iv-demo-cbc"
OBSERVATIONS = DATA / "Observation.ndjson.gz"
PATIENTS = DATA / "Patient.ndjson"
CONCEPT_MAP = DATA / "conceptmap.json"
LABITEMS = "http://mimic.mit.edu/fhir/mimic/CodeSystem/mimic-d-labitems"
CHARTEVENTS = "http://mimic.mit.edu/fhir/mimic/CodeSystem/mimic-chartevents-d-items"
UNITS = "http://mimic.mit.edu/fhir/mimic/CodeSystem/mimic-units"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"

# (MIMIC code system, item id) -> (LOINC code, LOINC display), from loinc.org.
LOINC_OF_ITEM: dict[tuple[str, str], tuple[str, str]] = {
    (LABITEMS, "51301"): ("6690-2", "Leukocytes [#/volume] in Blood by Automated count"),
    (LABITEMS, "51300"): ("26464-8", "Leukocytes [#/volume] in Blood"),
    (LABITEMS, "51256"): ("770-8", "Neutrophils/100 leukocytes in Blood by Automated count"),
    (LABITEMS, "51144"): ("764-1", "Band form neutrophils/100 leukocytes in Blood by Manual count"),
    (LABITEMS, "52075"): ("751-8", "Neutrophils [#/volume] in Blood by Automated count"),
    (LABITEMS, "51222"): ("718-7", "Hemoglobin [Mass/volume] in Blood"),
    (LABITEMS, "51265"): ("777-3", "Platelets [#/volume] in Blood by Automated count"),
    (CHARTEVENTS, "223761"): ("8310-5", "Body temperature"),
    (CHARTEVENTS, "223762"): ("8310-5", "Body temperature"),
}

# MIMIC's unit strings as UCUM codes (UCUM 2.1, https://ucum.org/ucum; "K" is kelvin in UCUM, so
# K/uL is 10*3/uL): `terminology.units` of a site config, or the codes a LOINC-coding site sends.
UCUM_OF_UNIT: dict[str, str] = {
    "K/uL": "10*3/uL",
    "%": "%",
    "#/uL": "/uL",
    "g/dL": "g/dL",
    "°F": "[degF]",
    "°C": "Cel",
}


def units_config() -> list[dict[str, str]]:
    """terminology.units for MIMIC's unit strings."""
    return [{"system": UNITS, "unit": unit, "ucum": ucum} for unit, ucum in UCUM_OF_UNIT.items()]


def read_observations() -> list[dict[str, Any]]:
    """Every Observation as MIMIC sends it (local codes, MIMIC unit strings)."""
    with gzip.open(OBSERVATIONS, "rb") as f:
        return [orjson.loads(line) for line in f if line.strip()]


def with_loinc(resource: dict[str, Any], *, display: bool = True, ucum: bool = True) -> dict[str, Any]:
    """A copy of one MIMIC Observation with the LOINC coding of its item added after the local one
    (none when the item is not mapped); with `ucum`, its unit also carries the UCUM code."""
    out = copy.deepcopy(resource)
    codings = out.get("code", {}).get("coding", [])
    for c in list(codings):
        term = LOINC_OF_ITEM.get((c.get("system"), c.get("code")))
        if term is not None:
            codings.append({"system": LOINC, "code": term[0]} | ({"display": term[1]} if display else {}))
    quantity = out.get("valueQuantity")
    if ucum and quantity is not None and quantity.get("unit") in UCUM_OF_UNIT:
        quantity.update({"system": UCUM, "code": UCUM_OF_UNIT[quantity["unit"]]})
    return out


def resources(data: Path = DATA) -> Iterator[dict[str, Any]]:
    """The Patients, then every Observation with its LOINC coding and UCUM unit (with_loinc)."""
    with (data / "Patient.ndjson").open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)
    with gzip.open(data / "Observation.ndjson.gz", "rt", encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield with_loinc(json.loads(line))


def write_ndjson(path: Path, data: Path = DATA) -> Path:
    """The LOINC-coded extract as one NDJSON file (replay's input)."""
    with path.open("w", encoding="utf-8") as out:
        for r in resources(data):
            out.write(json.dumps(r, separators=(",", ":")) + "\n")
    return path
