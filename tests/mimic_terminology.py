"""The MIMIC-IV demo extract (tests/data/mimic-iv-demo-cbc) with LOINC codings added beside its local
ones, so the same real data can be replayed as a LOINC-coding site writes it and compared with the
local-coded data read through the project's ConceptMap (tests/data/mimic-iv-demo-cbc/conceptmap.json).

The LOINC codes are written here once more, independently of the ConceptMap (a test of the map must
not read its expectations from the map); each from loinc.org: 6690-2 Leukocytes [#/volume] in Blood
by Automated count, 26464-8 Leukocytes [#/volume] in Blood, 770-8 Neutrophils/100 leukocytes in Blood
by Automated count, 764-1 Neutrophils.band form/100 leukocytes in Blood by Manual count, 751-8
Neutrophils [#/volume] in Blood by Automated count, 718-7 Hemoglobin [Mass/volume] in Blood, 777-3
Platelets [#/volume] in Blood by Automated count, 8310-5 Body temperature. 51218 Granulocyte Count is
not an ANC and has no LOINC coding added (the README of the data set).
"""

from __future__ import annotations

import copy
import gzip
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

LOINC_OF_ITEM: dict[tuple[str, str], str] = {
    (LABITEMS, "51301"): "6690-2",
    (LABITEMS, "51300"): "26464-8",
    (LABITEMS, "51256"): "770-8",
    (LABITEMS, "51144"): "764-1",
    (LABITEMS, "52075"): "751-8",
    (LABITEMS, "51222"): "718-7",
    (LABITEMS, "51265"): "777-3",
    (CHARTEVENTS, "223761"): "8310-5",
    (CHARTEVENTS, "223762"): "8310-5",
}

# MIMIC's unit strings as UCUM (UCUM 2.1, https://ucum.org/ucum): the `terminology.units` of a site config.
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
    with gzip.open(OBSERVATIONS, "rb") as f:
        return [orjson.loads(line) for line in f if line.strip()]


def with_loinc_codings(resource: dict[str, Any]) -> dict[str, Any]:
    """A copy of one MIMIC Observation with the LOINC coding of its item added after the local one
    (unchanged when the item has none)."""
    out = copy.deepcopy(resource)
    codings = out.get("code", {}).get("coding", [])
    added = [
        {"system": "http://loinc.org", "code": LOINC_OF_ITEM[(c["system"], c["code"])]}
        for c in codings
        if (c.get("system"), c.get("code")) in LOINC_OF_ITEM
    ]
    codings.extend(added)
    return out
