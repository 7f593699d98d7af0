#!/usr/bin/env python3
"""Generate helm/neutrowatch/values.schema.json: the chart's own values (written by hand below) plus a
`config` part generated from the service's settings model, so the two cannot drift.

    python scripts/values_schema.py           # write the file
    python scripts/values_schema.py --check   # exit 1 (with a diff) if the committed file is stale

The `config` part is `service.config.Settings.model_json_schema()` with:
  * every secret-valued field (type SecretStr: fhir.auth.bearer_token, store.dsn) removed, so that, with
    the model's additionalProperties: false, a secret placed in the values fails at install;
  * `$ref`s to `$defs` inlined (no `$defs` left), `title`s, object-valued defaults and pydantic's
    non-standard `format: path` dropped: the result is plain draft-07, which Helm 3 and Helm 4 evaluate
    the same way;
  * a few chart constraints added (grading.scheme from the built-in schemes, a fixed web.port, the state
    file on the data volume).
Cross-field rules that span `config` and the chart values (replicas vs backend, secrets vs auth method,
NetworkPolicy destinations) are in RULES below. The service's own model validators (e.g. http:// needs
allow_insecure_http) still run at start-up; tests/unit/test_chart.py loads the rendered config with them.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SCHEMA_PATH = ROOT / "helm" / "neutrowatch" / "values.schema.json"
DATA_DIR = "/var/lib/neutrowatch"

sys.path.insert(0, str(ROOT))

from pydantic import BaseModel, SecretStr  # noqa: E402 - after the sys.path line above

from service.config import Settings  # noqa: E402 - after the sys.path line above
from service.core.grading import BUILT_IN  # noqa: E402 - after the sys.path line above

Schema = dict[str, Any]


# --- config: from the model --------------------------------------------------------------------------


def _is_secret(annotation: Any) -> bool:
    if annotation is SecretStr:
        return True
    return any(_is_secret(arg) for arg in typing.get_args(annotation))


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        models = [m for m in (_model_of(a) for a in typing.get_args(annotation)) if m is not None]
        return models[0] if len(models) == 1 else None
    return None


def secret_fields(model: type[BaseModel] = Settings, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Paths of the SecretStr fields, found from the model's types (not from the schema's wording)."""
    found: list[tuple[str, ...]] = []
    for name, field in model.model_fields.items():
        path = (*prefix, field.alias or name)
        if _is_secret(field.annotation):
            found.append(path)
        elif (sub := _model_of(field.annotation)) is not None:
            found.extend(secret_fields(sub, path))
    return found


def _inline(node: Any, defs: Schema) -> Any:
    if isinstance(node, list):
        return [_inline(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    out: Schema = {}
    if "$ref" in node:
        ref = node["$ref"]
        if not ref.startswith("#/$defs/"):
            raise SystemExit(f"values_schema: unexpected $ref {ref!r}")
        out.update(_inline(copy.deepcopy(defs[ref.removeprefix("#/$defs/")]), defs))
    for key, value in node.items():
        if key == "$ref":
            continue
        if key == "title" and isinstance(value, str):
            continue
        if key == "default" and isinstance(value, dict):
            continue  # object defaults repeat the nested ones (and would name the secret fields)
        if key == "format" and value == "path":
            continue
        out[key] = value if key in ("default", "enum", "const", "pattern") else _inline(value, defs)
    return out


def _at(schema: Schema, path: tuple[str, ...]) -> Schema:
    node = schema
    for name in path:
        node = node["properties"][name]
    return node


def config_schema() -> Schema:
    raw = Settings.model_json_schema()
    defs = raw.pop("$defs", {})
    schema = _inline(raw, defs)
    for path in secret_fields():
        parent = _at(schema, path[:-1])
        if parent.get("additionalProperties") is not False:
            raise SystemExit(f"values_schema: {'.'.join(path[:-1]) or 'top level'} allows unknown fields")
        del parent["properties"][path[-1]]
    text = json.dumps(schema)
    leftover = [w for w in ("writeOnly", '"password"', "$ref", "$defs") if w in text]
    leftover += [".".join(p) for p in secret_fields() if f'"{p[-1]}"' in text]
    if leftover:
        raise SystemExit(f"values_schema: generated config schema still has {leftover}")

    schema["description"] = (
        "The service's configuration (config/default.yaml's fields), rendered as config.yaml. Generated from "
        "service.config.Settings by scripts/values_schema.py; secret values are not accepted here."
    )
    # Chart constraints on top of the model.
    scheme = _at(schema, ("grading", "scheme"))
    scheme["enum"] = sorted(BUILT_IN)
    port = _at(schema, ("web", "port"))
    port["minimum"] = 1
    port["description"] += " In the chart a fixed port (probes, Service, NetworkPolicy)."
    host = _at(schema, ("web", "host"))
    host["not"] = {"enum": ["127.0.0.1", "localhost", "::1"]}
    host["description"] += " Not loopback in the chart: the kubelet's probes come from outside the pod."
    path = _at(schema, ("store", "path"))
    path["pattern"] = rf"^({DATA_DIR}/|[^/])"
    path["not"] = {"pattern": r"(^|/)\.\.(/|$)"}
    path["default"] = f"{DATA_DIR}/state.sqlite3"
    path["description"] += (
        f" On the data volume: under {DATA_DIR}/ or relative to it (the working directory)."
    )
    return schema


# --- the chart's values: by hand -------------------------------------------------------------------------


def obj(properties: Schema, description: str | None = None, **extra: Any) -> Schema:
    out: Schema = {"type": "object", "additionalProperties": False, "properties": properties}
    if description:
        out["description"] = description
    out.update(extra)
    return out


def string(description: str | None = None, **extra: Any) -> Schema:
    out: Schema = {"type": "string", **extra}
    if description:
        out["description"] = description
    return out


FREE_OBJECT: Schema = {"type": "object"}
FREE_LIST: Schema = {"type": "array", "items": {"type": "object"}}
LABELS: Schema = {"type": "object", "additionalProperties": {"type": "string"}}
QUANTITY: Schema = {
    "type": ["string", "number"],
    "minimum": 0,
    "pattern": r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|Ki|Mi|Gi|Ti|Pi)?$",
}
PROBE: Schema = {"type": ["object", "null"], "description": "A Kubernetes probe; null to leave it out."}
DURATION: Schema = {"type": "string", "pattern": r"^([0-9]+(ms|s|m|h))+$"}
PEER: Schema = obj(
    {
        "ipBlock": obj(
            {
                "cidr": string(pattern=r"^[0-9a-fA-F:.]+/[0-9]{1,3}$"),
                "except": {"type": "array", "items": string(pattern=r"^[0-9a-fA-F:.]+/[0-9]{1,3}$")},
            },
            required=["cidr"],
        ),
        "namespaceSelector": FREE_OBJECT,
        "podSelector": FREE_OBJECT,
    },
    "A NetworkPolicyPeer: an ipBlock, or a namespaceSelector and/or podSelector.",
    minProperties=1,
)
PORTS: Schema = {
    "type": "array",
    "minItems": 1,
    "items": obj(
        {
            "port": {"type": ["integer", "string"]},
            "endPort": {"type": "integer"},
            "protocol": {"enum": ["TCP", "UDP", "SCTP"]},
        },
        required=["port"],
    ),
}


def destination(description: str, min_to: int = 0) -> Schema:
    return obj(
        {"to": {"type": "array", "items": PEER, "minItems": min_to}, "ports": PORTS},
        description,
    )


def chart_properties(config: Schema) -> Schema:
    return {
        "replicaCount": {
            "type": "integer",
            "minimum": 0,
            "description": (
                "Replicas. More than 1 needs config.store.backend postgres (one leader, ready standbys)."
            ),
        },
        "image": obj(
            {
                "repository": string(minLength=1),
                "tag": string("Defaults to the chart's appVersion."),
                "digest": string("sha256:...; wins over the tag.", pattern=r"^(|sha256:[0-9a-f]{64})$"),
                "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
            },
            required=["repository"],
        ),
        "imagePullSecrets": {"type": "array", "items": obj({"name": string(minLength=1)}, required=["name"])},
        "nameOverride": string(),
        "fullnameOverride": string(),
        "config": config,
        "existingSecret": obj(
            {
                "name": string("A Secret in the release namespace, created outside the chart."),
                "keys": obj(
                    {
                        "bearerToken": string(
                            "Key with the FHIR bearer token; sets fhir.auth.bearer_token_file."
                        ),
                        "smartPrivateKey": string(
                            "Key with the SMART private key (PEM); sets fhir.auth.smart.private_key_file."
                        ),
                        "dsn": string("Key with the PostgreSQL DSN; sets store.dsn_file."),
                        "pseudonymKey": string(
                            "Key with the key of patient pseudonyms in the logs; sets "
                            "logging.pseudonym_key_file."
                        ),
                    }
                ),
            },
            "Secrets by reference only: mounted as files under /var/run/secrets/neutrowatch.",
        ),
        "conceptMaps": obj(
            {
                "configMap": string(
                    "A ConfigMap in the release namespace holding FHIR R4 ConceptMap JSON files."
                ),
                "keys": {
                    "type": "array",
                    "uniqueItems": True,
                    "items": string(minLength=1, pattern=r"^[-._a-zA-Z0-9]+$"),
                    "description": (
                        "Its keys to mount under /etc/neutrowatch/conceptmaps; sets terminology.concept_maps."
                    ),
                },
            },
            "Site ConceptMaps (local codes to LOINC) mounted from a ConfigMap.",
        ),
        "serviceAccount": obj(
            {
                "create": {"type": "boolean"},
                "name": string(),
                "annotations": LABELS,
            }
        ),
        "podAnnotations": LABELS,
        "podLabels": LABELS,
        "podSecurityContext": FREE_OBJECT,
        "securityContext": FREE_OBJECT,
        "resources": obj(
            {
                "requests": obj({"cpu": QUANTITY, "memory": QUANTITY, "ephemeral-storage": QUANTITY}),
                "limits": obj({"cpu": QUANTITY, "memory": QUANTITY, "ephemeral-storage": QUANTITY}),
            }
        ),
        "livenessProbe": PROBE,
        "readinessProbe": PROBE,
        "startupProbe": PROBE,
        "terminationGracePeriodSeconds": {
            "type": "integer",
            "minimum": 15,
            "description": "The service drains a running poll cycle for up to 10 s on SIGTERM, then closes.",
        },
        "revisionHistoryLimit": {"type": "integer", "minimum": 0},
        "persistence": obj(
            {
                "enabled": {
                    "type": "boolean",
                    "description": "A PVC for the SQLite state (sqlite backend, one replica).",
                },
                "existingClaim": string(),
                "storageClass": string(),
                "accessModes": {
                    "type": "array",
                    "minItems": 1,
                    "items": {"enum": ["ReadWriteOnce", "ReadWriteOncePod", "ReadWriteMany"]},
                },
                "size": QUANTITY,
                "annotations": LABELS,
            }
        ),
        "dataSizeLimit": QUANTITY,
        "tmpSizeLimit": QUANTITY,
        "service": obj(
            {
                "type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                "publishNotReadyAddresses": {"type": "boolean"},
                "annotations": LABELS,
            }
        ),
        "podDisruptionBudget": obj(
            {
                "enabled": {"type": "boolean"},
                "minAvailable": {
                    "type": ["integer", "string"],
                    "minimum": 1,
                    "pattern": r"^[0-9]{1,3}%$",
                    "description": (
                        "With 2+ replicas. A single replica gets maxUnavailable 1 (never blocks a drain)."
                    ),
                },
            }
        ),
        "podAntiAffinity": {"enum": ["", "soft", "hard"]},
        "podAntiAffinityTopologyKey": string(minLength=1),
        "affinity": FREE_OBJECT,
        "topologySpreadConstraints": {
            "type": "array",
            "items": {"type": "object", "required": ["maxSkew", "topologyKey", "whenUnsatisfiable"]},
        },
        "nodeSelector": LABELS,
        "tolerations": FREE_LIST,
        "priorityClassName": string(),
        "extraEnv": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": string(
                        pattern=r"^[A-Za-z_][A-Za-z0-9_.-]*$", **{"not": {"pattern": "^NEUTROWATCH_"}}
                    )
                },
            },
            "description": (
                "Extra environment variables; NEUTROWATCH_* are refused (use config / existingSecret)."
            ),
        },
        "extraVolumes": FREE_LIST,
        "extraVolumeMounts": FREE_LIST,
        "serviceMonitor": obj(
            {
                "enabled": {"type": "boolean"},
                "namespace": string(),
                "labels": LABELS,
                "interval": DURATION,
                "scrapeTimeout": DURATION,
                "relabelings": FREE_LIST,
                "metricRelabelings": FREE_LIST,
            }
        ),
        "networkPolicy": obj(
            {
                "enabled": {"type": "boolean"},
                "ingress": obj(
                    {
                        "from": {
                            "type": "array",
                            "items": PEER,
                            "description": "Sources allowed to reach the metrics/health port. Empty: none.",
                        },
                    }
                ),
                "egress": obj(
                    {
                        "dns": obj(
                            {
                                "enabled": {"type": "boolean"},
                                "to": {"type": "array", "items": PEER},
                                "ports": PORTS,
                            }
                        ),
                        "fhirServer": destination(
                            "The FHIR server (and a SMART token endpoint on another host)."
                        ),
                        "database": destination("PostgreSQL (backend postgres)."),
                        "extraRules": FREE_LIST,
                    }
                ),
            }
        ),
    }


# --- cross-field rules -------------------------------------------------------------------------------------


def nested(path: str, leaf: Schema, required: bool = True) -> Schema:
    """{"properties": {a: {"properties": {b: leaf}}}} for "a.b", each level required unless told."""
    node = leaf
    for name in reversed(path.split(".")):
        node = {"properties": {name: node}, **({"required": [name]} if required else {})}
    return node


def all_of(*schemas: Schema) -> Schema:
    return {"allOf": list(schemas)}


NON_EMPTY: Schema = {"type": "string", "minLength": 1}
SET_PATH: Schema = {"type": "string", "minLength": 1}
ABSENT_OR_NULL: Schema = {"type": "null"}


def key_set(key: str) -> Schema:
    return all_of(nested("existingSecret.name", NON_EMPTY), nested(f"existingSecret.keys.{key}", NON_EMPTY))


def rule(comment: str, when: Schema, then: Schema) -> Schema:
    return {"$comment": comment, "if": when, "then": then}


RULES: list[Schema] = [
    rule(
        "More than one replica needs the postgres backend: SQLite state belongs to one replica.",
        nested("replicaCount", {"minimum": 2}),
        nested("config.store.backend", {"const": "postgres"}),
    ),
    rule(
        "A PVC is for the SQLite state.",
        nested("persistence.enabled", {"const": True}),
        nested("config.store.backend", {"const": "sqlite"}, required=False),
    ),
    rule(
        "The postgres backend needs the DSN: existingSecret.keys.dsn (or config.store.dsn_file for a DSN "
        "file mounted through extraVolumes).",
        nested("config.store.backend", {"const": "postgres"}),
        {"anyOf": [key_set("dsn"), nested("config.store.dsn_file", SET_PATH)]},
    ),
    rule(
        "fhir.auth.method bearer needs the token: existingSecret.keys.bearerToken (or "
        "config.fhir.auth.bearer_token_file).",
        nested("config.fhir.auth.method", {"const": "bearer"}),
        {"anyOf": [key_set("bearerToken"), nested("config.fhir.auth.bearer_token_file", SET_PATH)]},
    ),
    rule(
        "fhir.auth.method smart needs the private key (existingSecret.keys.smartPrivateKey or "
        "config.fhir.auth.smart.private_key_file) and fhir.auth.smart.client_id.",
        nested("config.fhir.auth.method", {"const": "smart"}),
        all_of(
            {
                "anyOf": [
                    key_set("smartPrivateKey"),
                    nested("config.fhir.auth.smart.private_key_file", SET_PATH),
                ]
            },
            nested("config.fhir.auth.smart.client_id", NON_EMPTY),
        ),
    ),
    rule(
        "A secret key without existingSecret.name references nothing.",
        {
            "anyOf": [
                nested(f"existingSecret.keys.{k}", NON_EMPTY)
                for k in ("bearerToken", "smartPrivateKey", "dsn", "pseudonymKey")
            ]
        },
        nested("existingSecret.name", NON_EMPTY),
    ),
    rule(
        "existingSecret.keys.bearerToken sets fhir.auth.bearer_token_file: do not set it in config too.",
        nested("existingSecret.keys.bearerToken", NON_EMPTY),
        nested("config.fhir.auth.bearer_token_file", ABSENT_OR_NULL, required=False),
    ),
    rule(
        "existingSecret.keys.smartPrivateKey sets fhir.auth.smart.private_key_file: do not set it in config "
        "too.",
        nested("existingSecret.keys.smartPrivateKey", NON_EMPTY),
        nested("config.fhir.auth.smart.private_key_file", ABSENT_OR_NULL, required=False),
    ),
    rule(
        "existingSecret.keys.dsn sets store.dsn_file: do not set it in config too.",
        nested("existingSecret.keys.dsn", NON_EMPTY),
        nested("config.store.dsn_file", ABSENT_OR_NULL, required=False),
    ),
    rule(
        "conceptMaps.keys name keys of conceptMaps.configMap: without it they reference nothing.",
        nested("conceptMaps.keys", {"minItems": 1}),
        nested("conceptMaps.configMap", NON_EMPTY),
    ),
    rule(
        "conceptMaps.configMap needs the keys to mount (the chart lists them in terminology.concept_maps).",
        nested("conceptMaps.configMap", NON_EMPTY),
        nested("conceptMaps.keys", {"minItems": 1}),
    ),
    rule(
        "conceptMaps sets terminology.concept_maps: do not set it in config too.",
        nested("conceptMaps.configMap", NON_EMPTY),
        nested("config.terminology.concept_maps", {"maxItems": 0}, required=False),
    ),
    rule(
        "An enabled NetworkPolicy needs a FHIR server destination (an empty list would allow any).",
        nested("networkPolicy.enabled", {"const": True}),
        nested("networkPolicy.egress.fhirServer.to", {"minItems": 1}),
    ),
    rule(
        "An enabled NetworkPolicy with the postgres backend needs a database destination.",
        all_of(
            nested("networkPolicy.enabled", {"const": True}),
            nested("config.store.backend", {"const": "postgres"}),
        ),
        nested("networkPolicy.egress.database.to", {"minItems": 1}),
    ),
]


def values_schema() -> Schema:
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "$comment": (
            "GENERATED by scripts/values_schema.py from the chart's rules and service.config.Settings; "
            "do not edit by hand (python scripts/values_schema.py rewrites it, --check compares)."
        ),
        "title": "neutrowatch chart values",
        "type": "object",
        "additionalProperties": False,
        "properties": chart_properties(config_schema()),
        "allOf": RULES,
    }


def render() -> str:
    return json.dumps(values_schema(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--check", action="store_true", help="exit 1 if the committed schema differs from the generated one"
    )
    p.add_argument("--output", type=Path, default=SCHEMA_PATH)
    args = p.parse_args(argv)
    text = render()
    try:  # a broken schema must not be written (jsonschema comes with the test extras)
        import jsonschema

        jsonschema.Draft7Validator.check_schema(json.loads(text))
    except ImportError:
        pass
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
        if current == text:
            print(f"{args.output.relative_to(ROOT)} is up to date")
            return 0
        diff = difflib.unified_diff(
            current.splitlines(), text.splitlines(), "committed", "generated", lineterm="", n=2
        )
        print("\n".join(list(diff)[:80]))
        print(
            f"{args.output.relative_to(ROOT)} is stale: run python scripts/values_schema.py", file=sys.stderr
        )
        return 1
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
