"""Synthetic FHIR R4 CBC-with-differential data for demos, benchmarks and replay tests.

Deterministic from ``PopulationSpec.seed``: every patient has its own ``random.Random`` seeded
from (seed, patient number), so patient N is the same whatever the population size.  Each
patient is a generator that keeps only a small heap of not-yet-due resources; ``generate``
merges them with ``heapq.merge`` in ``meta.lastUpdated`` order, so memory is O(patients).

Noisy Observations carry an extension ``NOISE_URL`` whose valueCode is one of ``NOISE_KINDS``;
corrections are a version 1 with a transcription error followed by a "corrected" version 2.
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any

import orjson

Resource = dict[str, Any]

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
LOCAL_LAB = "urn:oid:1.2.3.4.5.local-lab"
MRN_SYSTEM = "urn:oid:2.16.840.1.113883.19.5"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
DATA_ABSENT = "http://terminology.hl7.org/CodeSystem/data-absent-reason"
NON_UCUM = "http://example.org/lab-units"
NOISE_URL = "urn:neutrowatch:synthetic:noise"

NOISE_KINDS = (
    "anc-percent-unit",  # 751-8 carrying the neutrophil % with unit "%"
    "anc-26499-4-unit-error",  # 26499-4 = ANC in cells/uL labelled 10*3/uL (mCODE example bug)
    "unknown-unit",  # "bananas/uL"
    "data-absent",  # dataAbsentReason "error" instead of a value
    "value-string",  # valueString "<0.1"
    "preliminary-then-final",  # status preliminary v1, final v2 of the same id
    "comparator-lt",  # valid severe result: 751-8 "< 0.1 10*3/uL"
)
_NOISE_ON_ANC = {"anc-percent-unit", "anc-26499-4-unit-error", "value-string", "comparator-lt"}

MINUTE = 60_000
HOUR = 60 * MINUTE
DAY = 24 * HOUR
CYCLE_DAYS = 21
_GOLDEN, _SQRT2 = (math.sqrt(5) - 1) / 2, math.sqrt(2) - 1


@dataclass(frozen=True)
class PopulationSpec:
    patients: int = 40
    seed: int = 1
    start: datetime = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)
    days: int = 56
    chemo_fraction: float = 0.35  # chemo cycles with a nadir
    chronic_fraction: float = 0.05  # stable ANC 1000-1450
    noise_fraction: float = 0.02  # panels with one deliberately bad Observation
    temperatures: bool = True  # body temperatures, fever episodes near nadir
    corrections: float = 0.01  # lab Observations with a later "corrected" version


@dataclass(frozen=True)
class Analyte:
    loinc: str
    display: str
    text: str
    kind: str  # "count" (value kept in 10*3/uL), "pct" or "hb"
    ref: tuple[float, float]


_SEGS, _BANDS = "Segmented neutrophils", "Band form neutrophils"
ANALYTES: dict[str, Analyte] = {
    "wbc": Analyte(
        "6690-2", "Leukocytes [#/volume] in Blood by Automated count", "WBC", "count", (4.0, 11.0)
    ),
    "anc": Analyte(
        "751-8", "Neutrophils [#/volume] in Blood by Automated count", "Neut #", "count", (1.8, 7.7)
    ),
    "neut_pct": Analyte(
        "770-8", "Neutrophils/100 leukocytes in Blood by Automated count", "Neut %", "pct", (40.0, 75.0)
    ),
    "segs_pct": Analyte(
        "769-0", f"{_SEGS}/100 leukocytes in Blood by Manual count", "Segs", "pct", (40.0, 70.0)
    ),
    "bands_pct": Analyte(
        "764-1", f"{_BANDS}/100 leukocytes in Blood by Manual count", "Bands", "pct", (0.0, 5.0)
    ),
    "segs_abs": Analyte(
        "768-2", f"{_SEGS} [#/volume] in Blood by Manual count", "Segs #", "count", (1.8, 7.0)
    ),
    "bands_abs": Analyte(
        "763-3", f"{_BANDS} [#/volume] in Blood by Manual count", "Bands #", "count", (0.0, 0.7)
    ),
    "anc_any": Analyte("26499-4", "Neutrophils [#/volume] in Blood", "ANC", "count", (2.5, 5.0)),
    "hb": Analyte("718-7", "Hemoglobin [Mass/volume] in Blood", "Hgb", "hb", (12.0, 17.5)),
    "plt": Analyte("777-3", "Platelets [#/volume] in Blood by Automated count", "PLT", "count", (150, 400)),
}

_AUTO, _MANUAL = "CBC W Auto Differential panel - Blood", "CBC W Ordered Manual Differential panel - Blood"
# Panel kind -> (DiagnosticReport LOINC, display, analytes, the neutrophil analyte generic noise lands on)
PANELS: dict[str, tuple[str, str, tuple[str, ...], str]] = {
    "auto": ("57021-8", _AUTO, ("wbc", "anc", "neut_pct", "hb", "plt"), "anc"),
    "auto_pct": ("57021-8", _AUTO, ("wbc", "neut_pct", "hb", "plt"), "neut_pct"),
    "manual": ("57782-5", _MANUAL, ("wbc", "segs_pct", "bands_pct", "hb", "plt"), "segs_pct"),
    "abs_segs": ("57782-5", _MANUAL, ("wbc", "segs_abs", "bands_abs", "hb", "plt"), "segs_abs"),
}
PANEL_KINDS, PANEL_CUM_WEIGHTS = ("auto", "auto_pct", "manual", "abs_segs"), (0.60, 0.75, 0.90, 1.0)


@dataclass(frozen=True)
class CountUnit:
    unit: str
    system: str
    code: str
    scale: int  # multiply a 10*3/uL value by this


COUNT_UNITS = (
    CountUnit("10*3/uL", UCUM, "10*3/uL", 1),
    CountUnit("K/uL", UCUM, "10*3/uL", 1),
    CountUnit("x10*9/L", UCUM, "10*9/L", 1),
    CountUnit("cells/uL", UCUM, "/uL", 1000),
    CountUnit("K/uL", NON_UCUM, "K/uL", 1),
)
TZ_OFFSETS = (0, 60, 60, 120, -300, -480)  # minutes; lab sites in several zones

GIVEN = {
    "female": "Anna Maria Sofia Emma Aisha Mei Fatima Grace Inès Lena Priya Zoë".split(),
    "male": "James Lukas Noah Mateo Omar Wei David Arjun Jonas Kofi Pierre Samuel".split(),
}
FAMILY = (
    "Smith Müller Garcia Nguyen Okafor Kowalski Rossi Dubois Tanaka Haddad Silva Novak Cohen Patel O'Brien"
).split()


@lru_cache(maxsize=1024)
def _date(day: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(day * 86400))


def _clock(ms: int, offset_min: int) -> str:
    day, second = divmod(ms // 1000 + offset_min * 60, 86400)
    return f"{_date(day)}T{second // 3600:02d}:{second // 60 % 60:02d}:{second % 60:02d}"


def _zulu(ms: int) -> str:
    return f"{_clock(ms, 0)}.{ms % 1000:03d}Z"


def _local(ms: int, offset_min: int, suffix: str) -> str:
    return _clock(ms, offset_min) + suffix


def _tz_suffix(offset_min: int) -> str:
    sign = "+" if offset_min > 0 else "-"
    return f"{sign}{abs(offset_min) // 60:02d}:{abs(offset_min) % 60:02d}" if offset_min else "Z"


def _epoch_ms(dt: datetime) -> int:
    return int((dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp() * 1000)


def _randint(rng: random.Random, low: int, high: int) -> int:
    """Like ``rng.randint`` but cheaper (no rejection sampling; the tiny bias does not matter here)."""
    return low + int(rng.random() * (high - low + 1))


def _garble(rng: random.Random, v: float) -> float:
    """A transcription error of ``v`` (digit swap, decimal slip or re-run value), same precision."""
    nd = 0 if isinstance(v, int) else len(repr(v).partition(".")[2])
    r = rng.random()
    if r < 0.4:
        s = repr(v)
        spots = [i for i in range(len(s) - 1) if s[i].isdigit() and s[i + 1].isdigit() and s[i] != s[i + 1]]
        if spots:
            i = rng.choice(spots)
            s = s[:i] + s[i + 1] + s[i] + s[i + 2 :]
            return int(s) if nd == 0 else float(s)
    wrong = v * rng.choice((10, 0.1)) if r < 0.7 else v * rng.uniform(0.8, 1.2)
    return int(round(wrong)) if nd == 0 else round(wrong, nd)


def _cycle_shape(day: float, nadir_day: float) -> float:
    """0 at baseline, 1 at the nadir; cosine fall from cycle day 3, recovery by day 21."""
    if day < 3 or day >= CYCLE_DAYS:
        return 0.0
    if day <= nadir_day:
        return 0.5 - 0.5 * math.cos(math.pi * (day - 3) / (nadir_day - 3))
    return 0.5 + 0.5 * math.cos(math.pi * (day - nadir_day) / (CYCLE_DAYS - nadir_day))


class _Patient:
    """One patient's timeline.

    Draws are simulated one at a time.  Their resources wait in ``pending`` as
    (lastUpdated ms, seq, builder method name, args) and are built only when due: a waiting
    patient costs a few tuples of atoms (which the cyclic GC stops tracking), not kilobytes of dicts.
    """

    def __init__(self, spec: PopulationSpec, idx: int, start_ms: int, shift: tuple[float, float]) -> None:
        self.spec, self.idx, self.start_ms = spec, idx, start_ms
        rng = self.rng = random.Random(f"neutrowatch:{spec.seed}:{idx}")
        self.pid = f"nw{spec.seed}-p{idx:05d}"
        self.pending: list[tuple[int, int, str, tuple[Any, ...]]] = []
        self.seq = self.temp_no = 0
        # Kind and nadir depth follow a Kronecker sequence: fractions hold even for a 40-patient demo.
        u, depth = (shift[0] + idx * _GOLDEN) % 1.0, (shift[1] + idx * _SQRT2) % 1.0
        self.kind = (
            "chemo"
            if u < spec.chemo_fraction
            else ("chronic" if u < spec.chemo_fraction + spec.chronic_fraction else "normal")
        )
        self.baseline = rng.uniform(1100, 1350) if self.kind == "chronic" else rng.uniform(2000, 6500)
        fraction = rng.uniform(0.45, 0.75)
        self.other = self.baseline * (1 - fraction) / fraction  # non-neutrophil leukocytes, cells/uL
        self.hb = rng.uniform(10.0, 13.5) if self.kind == "chemo" else rng.uniform(11.5, 15.0)
        self.plt, self.plt_sensitivity = rng.uniform(150, 400), rng.uniform(0.2, 0.95)
        self.unit, self.tz = rng.choice(COUNT_UNITS), rng.choice(TZ_OFFSETS)
        self.tz_suffix = _tz_suffix(self.tz)
        self.local_codes, self.orders = rng.random() < 0.3, rng.random() < 0.5
        self.fahrenheit, self.oral = rng.random() < 0.3, rng.random() < 0.3
        self.cycle0, self.cycles, self.nadir_day = (
            _randint(rng, 0, 10),
            _randint(rng, 4, 8),
            rng.uniform(7, 14),
        )
        self.nadir_band = (
            (40, 480)
            if depth < 0.3
            else (520, 980)
            if depth < 0.6
            else (1020, 1480)
            if depth < 0.85
            else None
        )  # None: the nadir stays above 1500
        self.fever_prone = rng.random() < 0.4
        self.cycle_no, self.cycle_nadir, self.cycle_anc, self.fever_cycle = -1, 0.0, 0.0, -1
        self.near_nadir = False

    def stream(self) -> Iterator[tuple[int, int, int, Resource]]:
        rng, pending = self.rng, self.pending
        first_ms = self.start_ms - 9 * HOUR - _randint(rng, 0, 240 * HOUR)
        yield first_ms, self.idx, -1, self._patient_resource(first_ms)
        day, draw_no = _randint(rng, 0, 4), 1
        while day < self.spec.days:
            wide = rng.random() < 0.1  # an off-hours draw
            t = (
                self.start_ms
                + day * DAY
                + _randint(rng, -480 if wide else -120, 840 if wide else 240) * MINUTE
            )
            while pending and pending[0][0] <= t - HOUR:  # nothing from this draw on is earlier
                yield self._pop()
            self._draw(draw_no, t)
            day, draw_no = self._next_day(day), draw_no + 1
        while pending:
            yield self._pop()

    def _push(self, ms: int, build: str, *args: Any) -> None:
        heapq.heappush(self.pending, (ms, self.seq, build, args))
        self.seq += 1

    def _pop(self) -> tuple[int, int, int, Resource]:
        ms, seq, build, args = heapq.heappop(self.pending)
        res = getattr(self, build)(*args)
        res["meta"]["lastUpdated"] = _zulu(ms)
        return ms, self.idx, seq, res

    def _local(self, ms: int) -> str:
        return _local(ms, self.tz, self.tz_suffix)

    def _patient_resource(self, ms: int) -> Resource:
        rng = self.rng
        gender = rng.choice(("female", "male"))
        u = rng.random()
        age_days = (
            _randint(rng, 14, 335)
            if u < 0.01
            else _randint(rng, 365, 17 * 365 + 364)
            if u < 0.06
            else _randint(rng, 18 * 365, 90 * 365 + 364)
        )
        return {
            "resourceType": "Patient",
            "id": self.pid,
            "meta": {"versionId": "1", "lastUpdated": _zulu(ms)},
            "identifier": [{"system": MRN_SYSTEM, "value": f"MRN{self.spec.seed}-{self.idx:06d}"}],
            "name": [{"family": rng.choice(FAMILY), "given": [rng.choice(GIVEN[gender])]}],
            "gender": gender,
            "birthDate": (self.spec.start - timedelta(days=age_days)).date().isoformat(),
        }

    def _next_day(self, day: int) -> int:
        rng = self.rng
        since = day - self.cycle0
        if self.kind != "chemo":
            return day + _randint(rng, 2, 7)
        if 0 <= since < CYCLE_DAYS * self.cycles and 5 <= since % CYCLE_DAYS <= 16:
            return day + _randint(rng, 1, 3)
        k = max(0, math.ceil((since + 1 - 6) / CYCLE_DAYS))  # the next cycle day 6 must not be skipped
        step = day + _randint(rng, 2, 7)
        return min(step, self.cycle0 + 6 + CYCLE_DAYS * k + _randint(rng, 0, 1)) if k < self.cycles else step

    def _state(self, t: int) -> tuple[float, float]:
        """Measured ANC (cells/uL) and marrow suppression 0..1 at time ``t``."""
        rng = self.rng
        noise = rng.gauss(1.0, 0.04)
        self.near_nadir = False
        if self.kind == "chronic":
            return min(1445.0, max(1005.0, self.baseline * noise)), 0.0
        day = (t - self.start_ms) / DAY - self.cycle0
        cycle = int(day // CYCLE_DAYS)
        if self.kind != "chemo" or day < 0 or cycle >= self.cycles:
            return self.baseline * noise, 0.0
        if cycle != self.cycle_no:
            self.cycle_no = cycle
            self.cycle_nadir = min(14.0, max(7.0, self.nadir_day + rng.uniform(-1, 1)))
            band = self.nadir_band
            self.cycle_anc = (
                rng.uniform(*band) if band else max(1600.0, self.baseline * rng.uniform(0.4, 0.8))
            )
        shape = _cycle_shape(day - cycle * CYCLE_DAYS, self.cycle_nadir)
        self.near_nadir = shape >= 0.6
        ratio = min(1.0, self.cycle_anc / self.baseline)
        return self.baseline * ratio**shape * noise, shape * (1 - ratio)

    def _draw(self, n: int, t: int) -> None:
        rng, spec = self.rng, self.spec
        anc, suppression = self._state(t)
        noise = rng.choice(NOISE_KINDS) if rng.random() < spec.noise_fraction else None
        if noise == "comparator-lt":
            anc = rng.uniform(15, 95)
        kind = (
            "auto" if noise in _NOISE_ON_ANC else rng.choices(PANEL_KINDS, cum_weights=PANEL_CUM_WEIGHTS)[0]
        )
        values = self._values(kind, anc, suppression)
        draw_id = f"{self.pid}-d{n:03d}"
        issued = t + _randint(rng, 30, 180) * MINUTE
        when = (self._local(t), self._local(issued))
        order = f"ServiceRequest/{draw_id}-sr" if self.orders else None
        ms = done = issued + _randint(rng, 1000, 8000)
        noisy_key = "anc" if noise in _NOISE_ON_ANC else PANELS[kind][3]
        ids = []
        for key in PANELS[kind][2]:
            tag = noise if key == noisy_key else None
            value = values["neut_pct"] if tag == "anc-percent-unit" else values[key]
            oid = f"{draw_id}-{'26499-4' if tag == 'anc-26499-4-unit-error' else ANALYTES[key].loinc}"
            ids.append(oid)
            args = (oid, draw_id, key, value, when, order, tag)
            if tag == "preliminary-then-final":
                self._push(ms, "_lab_obs", *args, "preliminary")
                done = ms + _randint(rng, 30, 360) * MINUTE
                self._push(done, "_lab_obs", *args, "final", 2, self._local(done - 4000))
            elif (
                tag is None
                and rng.random() < spec.corrections
                and (wrong := _garble(rng, value)) not in (0, value)
            ):
                fixed = ms + _randint(rng, 2 * HOUR, 36 * HOUR)  # version 1 carries a transcription error
                self._push(ms, "_lab_obs", oid, draw_id, key, wrong, when, order, None)
                self._push(fixed, "_lab_obs", *args, "corrected", 2, self._local(fixed - 4000))
            else:
                self._push(ms, "_lab_obs", *args)
            ms += _randint(rng, 20, 400)
        self._push(
            max(ms, done) + _randint(rng, 200, 2000), "_report", draw_id, kind, when, order, tuple(ids)
        )
        if spec.temperatures:
            self._temperatures(t)

    def _values(self, kind: str, anc: float, suppression: float) -> dict[str, float]:
        """Reported values: counts in 10*3/uL (2 dp, platelets whole), percents, g/dL."""
        rng = self.rng
        other = self.other * (0.6 + 0.4 * min(1.0, anc / self.baseline)) * rng.gauss(1.0, 0.05)
        wbc = max(0.05, round((anc + other) / 1000, 2))
        pct = round(100 * anc / (anc + other), 1)
        v: dict[str, float] = {
            "wbc": wbc,
            "neut_pct": pct,
            "anc": round(wbc * pct / 100, 2),
            "hb": round(min(15.0, max(8.0, self.hb - 2.5 * suppression + rng.gauss(0, 0.25))), 1),
            "plt": round(
                min(
                    400.0, max(20.0, self.plt * (1 - self.plt_sensitivity * suppression) * rng.gauss(1, 0.05))
                )
            ),
        }
        if kind in ("manual", "abs_segs"):  # a 100-cell manual count: whole percents
            neut = round(pct)
            bands = min(neut, _randint(rng, 0, 5) if rng.random() < 0.9 else _randint(rng, 6, 15))
            v.update(
                segs_pct=neut - bands,
                bands_pct=bands,
                segs_abs=round(wbc * (neut - bands) / 100, 2),
                bands_abs=round(wbc * bands / 100, 2),
            )
        return v

    def _quantity(self, a: Analyte, v: float) -> Resource:
        if a.kind == "pct":
            return {"value": v, "unit": "%", "system": UCUM, "code": "%"}
        if a.kind == "hb":
            return {"value": v, "unit": "g/dL", "system": UCUM, "code": "g/dL"}
        u = self.unit
        return {
            "value": v if u.scale == 1 else int(round(v * u.scale)),
            "unit": u.unit,
            "system": u.system,
            "code": u.code,
        }

    def _lab_obs(
        self,
        oid: str,
        draw_id: str,
        key: str,
        value: float,
        when: tuple[str, str],
        order: str | None,
        noise: str | None,
        status: str = "final",
        version: int = 1,
        issued: str | None = None,
    ) -> Resource:
        a = ANALYTES["anc_any" if noise == "anc-26499-4-unit-error" else key]
        coding = [{"system": LOINC, "code": a.loinc, "display": a.display}]
        if self.local_codes:
            coding.insert(0, {"system": LOCAL_LAB, "code": f"CBC.{key.upper()}", "display": a.text})
        obs: Resource = {
            "resourceType": "Observation",
            "id": oid,
            "meta": {"versionId": str(version)},
            "status": status,
            "category": [
                {"coding": [{"system": OBS_CATEGORY, "code": "laboratory", "display": "Laboratory"}]}
            ],
            "code": {"coding": coding, "text": a.text},
            "subject": {"reference": f"Patient/{self.pid}"},
            "effectiveDateTime": when[0],
            "issued": issued or when[1],
            "specimen": {"reference": f"Specimen/{draw_id}-sp"},
            "valueQuantity": self._quantity(a, value),
            "referenceRange": [{"low": self._quantity(a, a.ref[0]), "high": self._quantity(a, a.ref[1])}],
        }
        if order:
            obs["basedOn"] = [{"reference": order}]
        if noise:
            _add_noise(obs, noise, value)
        return obs

    def _report(
        self, draw_id: str, kind: str, when: tuple[str, str], order: str | None, ids: tuple[str, ...]
    ) -> Resource:
        code, display = PANELS[kind][:2]
        report: Resource = {
            "resourceType": "DiagnosticReport",
            "id": f"{draw_id}-dr",
            "meta": {"versionId": "1"},
            "status": "final",
            "category": [{"coding": [{"system": V2_0074, "code": "LAB", "display": "Laboratory"}]}],
            "code": {"coding": [{"system": LOINC, "code": code, "display": display}], "text": "CBC w/ diff"},
            "subject": {"reference": f"Patient/{self.pid}"},
            "effectiveDateTime": when[0],
            "issued": when[1],
            "specimen": [{"reference": f"Specimen/{draw_id}-sp"}],
            "result": [{"reference": f"Observation/{oid}"} for oid in ids],
        }
        if order:
            report["basedOn"] = [{"reference": order}]
        return report

    def _temperatures(self, t: int) -> None:
        """One reading at the draw, sometimes one in between; maybe a fever episode near the nadir."""
        rng = self.rng
        self._temperature(t - _randint(rng, 0, 30) * MINUTE, min(37.7, rng.gauss(36.8, 0.3)))
        if rng.random() < 0.25:
            self._temperature(t + _randint(rng, 6 * 60, 30 * 60) * MINUTE, min(37.7, rng.gauss(36.9, 0.35)))
        if not (self.fever_prone and self.near_nadir) or self.cycle_no == self.fever_cycle:
            return
        self.fever_cycle = self.cycle_no  # one decision per cycle, at the first draw near the nadir
        if rng.random() >= 0.7:
            return
        onset = t + _randint(rng, 2 * 60, 20 * 60) * MINUTE
        if rng.random() < 0.5:
            self._temperature(onset, rng.uniform(38.4, 39.8))
            return
        readings, span = _randint(rng, 2, 4), _randint(rng, 60, 180)  # >= 38.0 sustained for 1-3 h
        for i in range(readings):
            self._temperature(onset + i * span * MINUTE // (readings - 1), rng.uniform(38.05, 38.25))

    def _temperature(self, t: int, celsius: float) -> None:
        self.temp_no += 1
        issued = t + _randint(self.rng, 0, 5 * MINUTE)
        self._push(
            issued + _randint(self.rng, 500, 5000),
            "_temperature_obs",
            self.temp_no,
            t,
            issued,
            min(41.0, max(35.5, celsius)),
        )

    def _temperature_obs(self, n: int, t: int, issued: int, celsius: float) -> Resource:
        coding = [{"system": LOINC, "code": "8310-5", "display": "Body temperature"}]
        if self.oral:
            coding.append({"system": LOINC, "code": "8331-1", "display": "Oral temperature"})
        value = (
            {"value": round(celsius * 9 / 5 + 32, 1), "unit": "°F", "system": UCUM, "code": "[degF]"}
            if self.fahrenheit
            else {"value": round(celsius, 1), "unit": "°C", "system": UCUM, "code": "Cel"}
        )
        return {
            "resourceType": "Observation",
            "id": f"{self.pid}-t{n:04d}",
            "meta": {"versionId": "1"},
            "status": "final",
            "category": [
                {"coding": [{"system": OBS_CATEGORY, "code": "vital-signs", "display": "Vital Signs"}]}
            ],
            "code": {"coding": coding, "text": "Temp"},
            "subject": {"reference": f"Patient/{self.pid}"},
            "effectiveDateTime": self._local(t),
            "issued": self._local(issued),
            "valueQuantity": value,
        }


def _add_noise(obs: Resource, noise: str, value: float) -> None:
    """Tag ``obs`` with its noise kind and spoil it accordingly (preliminary-then-final: tag only)."""
    obs["extension"] = [{"url": NOISE_URL, "valueCode": noise}]
    k_ul = {"unit": "10*3/uL", "system": UCUM, "code": "10*3/uL"}
    match noise:
        case "anc-percent-unit":  # ``value`` is the neutrophil %
            obs["valueQuantity"] = {"value": value, "unit": "%", "system": UCUM, "code": "%"}
            del obs["referenceRange"]
        case "anc-26499-4-unit-error":  # the ANC in cells/uL, labelled 10*3/uL, as in the mCODE example
            obs["valueQuantity"] = {"value": int(round(value * 1000)), **k_ul}
            obs["referenceRange"] = [{"low": {"value": 2500, **k_ul}, "high": {"value": 5000, **k_ul}}]
        case "unknown-unit":
            obs["valueQuantity"].update(unit="bananas/uL", code="bananas/uL")
            del obs["referenceRange"]
        case "comparator-lt":
            obs["valueQuantity"] = {"value": 0.1, "comparator": "<", **k_ul}
        case "data-absent":
            del obs["valueQuantity"]
            obs["dataAbsentReason"] = {
                "coding": [{"system": DATA_ABSENT, "code": "error", "display": "Error"}],
                "text": "Specimen clotted",
            }
        case "value-string":
            del obs["valueQuantity"]
            obs["valueString"] = "<0.1"


def generate(spec: PopulationSpec) -> Iterator[Resource]:
    """Yield Patients, DiagnosticReports and Observations in nondecreasing meta.lastUpdated order."""
    start_ms, seeded = _epoch_ms(spec.start), random.Random(f"neutrowatch:{spec.seed}")
    shift = (seeded.random(), seeded.random())
    streams = [_Patient(spec, i, start_ms, shift).stream() for i in range(1, spec.patients + 1)]
    for _ms, _idx, _seq, res in heapq.merge(*streams):
        yield res


def _write(spec: PopulationSpec, path: Path) -> Counter[str]:
    counts: Counter[str] = Counter()
    dumps, option = orjson.dumps, orjson.OPT_APPEND_NEWLINE
    with open(path, "wb", buffering=1 << 20) as fh:
        write = fh.write
        for res in generate(spec):
            write(dumps(res, option=option))
            counts[res["resourceType"]] += 1
    return counts


def write_ndjson(spec: PopulationSpec, path: Path) -> int:
    """Stream ``generate(spec)`` to ``path`` as NDJSON; returns the number of lines."""
    return sum(_write(spec, path).values())


def observations_target(
    n_observations: int, patients: int, seed: int, *, base: PopulationSpec | None = None
) -> PopulationSpec:
    """A spec whose ``days`` yields about ``n_observations`` Observation lines (versions included).

    Calibrated on the first <=100 patients: patient N is the same in any population size.
    """
    spec = replace(base or PopulationSpec(), patients=patients, seed=seed)
    sample = min(patients, 100)
    days = max(1, round(n_observations / (max(patients, 1) * 1.7)))  # ~1.7 per patient-day by default
    for _ in range(3):
        probe = replace(spec, patients=sample, days=days)
        got = sum(r["resourceType"] == "Observation" for r in generate(probe)) * patients / max(sample, 1)
        if not got or abs(got - n_observations) <= 0.02 * n_observations:
            break
        days = max(1, round(days * n_observations / got))
    return replace(spec, days=days)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.synthetic", description=__doc__.splitlines()[0])
    p.add_argument("--patients", type=int, default=PopulationSpec.patients)
    p.add_argument("--seed", type=int, default=PopulationSpec.seed)
    p.add_argument("--days", type=int, help=f"default {PopulationSpec.days}; ignored with --observations")
    p.add_argument("--observations", type=int, help="choose --days to produce about this many Observations")
    p.add_argument(
        "--start", type=datetime.fromisoformat, help="ISO datetime of day 0 (default 2026-01-05T08:00Z)"
    )
    p.add_argument("--no-temperatures", action="store_true")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    base = PopulationSpec(temperatures=not args.no_temperatures)
    base = replace(base, start=args.start) if args.start else base
    if args.observations:
        spec = observations_target(args.observations, args.patients, args.seed, base=base)
    else:
        spec = replace(base, patients=args.patients, seed=args.seed, days=args.days or base.days)
    began = time.perf_counter()
    counts = _write(spec, args.out)
    print(
        f"{args.out}: patients={spec.patients} seed={spec.seed} days={spec.days} "
        f"lines={sum(counts.values())} "
        f"in {time.perf_counter() - began:.1f} s",
        file=sys.stderr,
    )
    for resource_type, n in sorted(counts.items()):
        print(f"  {resource_type}: {n}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
