"""Load resources into, and export them from, a FHIR server (sync, stdlib only): used by the
integration tests and `make demo` to stage data on the test engine."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterable, Iterator
from typing import Any

Resource = dict[str, Any]


def _request(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    # Staging and exporting are the test's own bookkeeping, not the client under test: exempt from the
    # engine's quota and injected conflicts (README: quota and conflicts).
    req = urllib.request.Request(
        url,
        data=data,
        method=method,
        headers={
            "Content-Type": "application/fhir+json",
            "Accept": "application/fhir+json",
            "X-Engine-Unmetered": "true",
            **(headers or {}),
        },
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read() or b"null")


def batches(resources: Iterable[Resource], size: int) -> Iterator[list[Resource]]:
    """Chunks of at most `size`, cut early so one chunk never holds two versions of one resource
    (the engine does not apply a batch's entries in order)."""
    chunk: list[Resource] = []
    ids: set[tuple[str, str]] = set()
    for r in resources:
        key = (r["resourceType"], r["id"])
        if len(chunk) >= size or key in ids:
            yield chunk
            chunk, ids = [], set()
        chunk.append(r)
        ids.add(key)
    if chunk:
        yield chunk


def put_all(
    base_url: str,
    resources: Iterable[Resource],
    *,
    batch_size: int = 200,
    keep_meta: bool = False,
    token: str | None = None,
) -> int:
    """PUT each resource by id in batch Bundles (a repeated id becomes a new version). With
    `keep_meta` the engine keeps the resources' own meta.lastUpdated (the X-Engine-Keep-Meta header);
    `token` for an engine started with a bearer token file."""
    count = 0
    headers = {"X-Engine-Keep-Meta": "true"} if keep_meta else {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    for chunk in batches(resources, batch_size):
        bundle = {
            "resourceType": "Bundle",
            "type": "batch",
            "entry": [
                {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
                for r in chunk
            ],
        }
        response = _request("POST", base_url, bundle, headers)
        failed = [
            e["response"]["status"]
            for e in response.get("entry", [])
            if not str(e["response"]["status"]).startswith("2")
        ]
        if failed:
            raise RuntimeError(f"engine refused {len(failed)} of {len(chunk)} resources: {failed[:3]}")
        count += len(chunk)
    return count


def export(base_url: str, resource_type: str, params: str = "") -> list[Resource]:
    """Every current resource of a type, following next links."""
    url: str | None = f"{base_url}/{resource_type}?_count=1000{('&' + params) if params else ''}"
    out: list[Resource] = []
    while url:
        bundle = _request("GET", url)
        out.extend(e["resource"] for e in bundle.get("entry", []))
        url = next((link["url"] for link in bundle.get("link", []) if link.get("relation") == "next"), None)
    return out


def export_history(base_url: str, resource_type: str) -> list[Resource]:
    """Every version of every resource of a type (one _history read per resource: small data only)."""
    out: list[Resource] = []
    for current in export(base_url, resource_type):
        bundle = _request("GET", f"{base_url}/{resource_type}/{current['id']}/_history")
        out.extend(e["resource"] for e in bundle.get("entry", []) if "resource" in e)
    return out
