#!/usr/bin/env bash
# Build the service image without registry access and check it by running it (make image-test).
#
#   bash scripts/image_test.sh            # from the repository root (it cd's there itself)
#
# What it does, each step printed as it goes:
#   1. installs podman, buildah, debootstrap and runc from Debian's packages when missing, and the
#      project's .venv / test FHIR engine (`make install`) when missing;
#   2. writes build/image/containers.conf for this kind of machine and exports CONTAINERS_CONF;
#   3. builds the base image localhost/neutrowatch-base:bookworm with debootstrap (minbase + python3,
#      python3-venv, ca-certificates) from apt's configured Debian mirror, unless podman already has it;
#   4. lints the Dockerfile with hadolint (any finding fails);
#   5. stages the build context in build/image/context: the wheels of requirements.lock (pip download
#      on the host, hashes checked), the project's own wheel (pip wheel --no-deps on the host) and
#      the files the Dockerfile copies;
#   6. podman build --network none --pull=never (nothing is fetched during the build);
#   7. runs the image and checks it: `replay --help`; `run` read-only, as uid 10001, against the test
#      FHIR engine on loopback until /healthz and /readyz answer 200 and the first alerts are written;
#      the root filesystem refuses writes; no compiler, pip or pip cache in the image; its size.
# Containers, the volume and the engine are removed on exit; the base image stays cached (remove it
# with `podman rmi localhost/neutrowatch-base:bookworm` to rebuild it). Needs root (apt, debootstrap,
# rootful podman). Environment: NEUTROWATCH_IMAGE (tag to build, default localhost/neutrowatch:test),
# DEBIAN_MIRROR (default: apt's configured one), IMAGE_TEST_TIMEOUT (seconds per wait, default 60).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

IMAGE=${NEUTROWATCH_IMAGE:-localhost/neutrowatch:test}
BASE_IMAGE=localhost/neutrowatch-base:bookworm
SUITE=bookworm
WORK=$ROOT/build/image
CTX=$WORK/context
TIMEOUT=${IMAGE_TEST_TIMEOUT:-60}
RUN_ID=nw-imgtest-$$
CTR=$RUN_ID-run
VOLUME=$RUN_ID-state
ENGINE_PID=
T0=$SECONDS

step() { printf '\n==> [%3ds] %s\n' "$((SECONDS - T0))" "$*"; }
say() { printf '    %s\n' "$*"; }
run() { printf '+ %s\n' "$*"; "$@"; }
die() { printf '\nFAIL: %s\n' "$*" >&2; exit 1; }

# -- clean-up: containers, the volume and the engine; never the base image ----------------------------
cleanup() {
  local rc=$?
  set +e
  if podman container exists "$CTR" 2>/dev/null; then
    if [ "$rc" -ne 0 ]; then
      printf '\n---- logs of container %s ----\n' "$CTR" >&2
      podman logs "$CTR" 2>&1 | tail -n 80 >&2
      printf -- '---- end of logs ----\n' >&2
    fi
    podman rm -f -t 5 "$CTR" >/dev/null 2>&1
  fi
  podman volume rm -f "$VOLUME" >/dev/null 2>&1
  if [ -n "$ENGINE_PID" ]; then
    if [ "$rc" -ne 0 ] && [ -s "$WORK/engine.err" ]; then
      printf '\n---- FHIR engine stderr (tail) ----\n' >&2; tail -n 20 "$WORK/engine.err" >&2
    fi
    kill "$ENGINE_PID" 2>/dev/null && wait "$ENGINE_PID" 2>/dev/null
  fi
  if [ "$rc" -eq 0 ]; then
    printf '\nimage test passed in %ds\n' "$((SECONDS - T0))"
  else
    printf '\nimage test FAILED (exit %d) after %ds\n' "$rc" "$((SECONDS - T0))" >&2
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

[ "$(id -u)" -eq 0 ] || die "needs root (apt-get, debootstrap, rootful podman)"
mkdir -p "$WORK"

# -- 1. tools ------------------------------------------------------------------------------------------
step "tools: podman buildah debootstrap runc"
missing=()
for pkg in podman buildah debootstrap runc; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  install_cmd=(apt-get install -y --no-install-recommends "${missing[@]}")
  if ! run "${install_cmd[@]}"; then
    say "install failed; refreshing the package lists and trying again"
    run apt-get update
    run "${install_cmd[@]}"
  fi
else
  say "all installed"
fi
if [ ! -x .venv/bin/hadolint ] || [ ! -f tests/fhir_server/node_modules/@medplum/fhir-router/package.json ]; then
  say ".venv or the test FHIR engine's node_modules are missing"
  run make install
fi
command -v node >/dev/null || die "node (Node.js 20+) is needed for the test FHIR engine"
say "$(podman --version), $(runc --version | head -n1), hadolint $(.venv/bin/hadolint --version | head -n1)"

# -- 2. containers.conf --------------------------------------------------------------------------------
# runc: crun (podman's usual default) fails on this machine's cgroups (v1, no systemd).
# default_ulimits: otherwise the runtime tries to raise the container's limits above this machine's
# hard limits and fails (EPERM on RLIMIT_NOFILE), so ask for no more than the hard limits allow.
# cgroupfs and a file event log: there is no systemd.
step "containers.conf"
hard_nofile=$(ulimit -Hn); hard_nproc=$(ulimit -Hu)
nofile=20000; nproc=32768
[ "$hard_nofile" != unlimited ] && [ "$hard_nofile" -lt "$nofile" ] && nofile=$hard_nofile
[ "$hard_nproc" != unlimited ] && [ "$hard_nproc" -lt "$nproc" ] && nproc=$hard_nproc
cat >"$WORK/containers.conf" <<EOF
# Written by scripts/image_test.sh for this machine; do not edit (it is rewritten on every run).
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
export CONTAINERS_CONF=$WORK/containers.conf
say "CONTAINERS_CONF=$CONTAINERS_CONF (nofile=$nofile nproc=$nproc, runtime runc, cgroupfs)"

# -- 3. base image -------------------------------------------------------------------------------------
step "base image $BASE_IMAGE"
debian_mirror() {
  # The first Debian archive URL apt is configured with (deb822 .sources or one-line .list), not the
  # security archive; DEBIAN_MIRROR overrides it.
  if [ -n "${DEBIAN_MIRROR:-}" ]; then echo "$DEBIAN_MIRROR"; return; fi
  local url
  url=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null \
    | sed -n -E 's/^[[:space:]]*(URIs:|deb([[:space:]]+\[[^]]*\])?)[[:space:]]+([a-z]+:\/\/[^[:space:]]+).*/\3/p' \
    | grep -E '/debian/?$' | head -n1 || true)
  echo "${url:-http://deb.debian.org/debian}"
}
if podman image exists "$BASE_IMAGE"; then
  say "cached in podman's store: $(podman image inspect --format '{{.Id}}' "$BASE_IMAGE" | cut -c1-12)"
else
  ROOTFS=$WORK/rootfs
  if [ -f "$WORK/rootfs.done" ] && [ -d "$ROOTFS" ]; then
    say "re-using the debootstrapped tree $ROOTFS"
  else
    rm -rf "$ROOTFS" "$WORK/rootfs.done"
    mirror=$(debian_mirror)
    say "debootstrap from $mirror (takes about a minute; log in $WORK/debootstrap.log)"
    t=$SECONDS
    if ! run debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        "$SUITE" "$ROOTFS" "$mirror" >"$WORK/debootstrap.log" 2>&1; then
      tail -n 30 "$WORK/debootstrap.log" >&2
      die "debootstrap failed"
    fi
    # Slim it as Debian's -slim images do: no package caches or lists, docs (copyrights kept), man
    # pages or translations.
    rm -rf "$ROOTFS"/var/cache/apt/* "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/log/*.log \
      "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* "$ROOTFS"/usr/share/locale/*
    find "$ROOTFS"/usr/share/doc -mindepth 1 -not -name copyright -not -type d -delete
    find "$ROOTFS"/usr/share/doc -mindepth 1 -type d -empty -delete
    touch "$WORK/rootfs.done"
    say "debootstrap done in $((SECONDS - t))s"
  fi
  printf '+ tar -C %s -c . | podman import - %s\n' "$ROOTFS" "$BASE_IMAGE"
  tar -C "$ROOTFS" --numeric-owner -c . | podman import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    --message "debootstrap --variant=minbase $SUITE + python3 python3-venv ca-certificates" \
    - "$BASE_IMAGE" >/dev/null
  say "imported: $(podman image inspect --format '{{.Id}}' "$BASE_IMAGE" | cut -c1-12)"
fi

# -- 4. hadolint -----------------------------------------------------------------------------------------
step "hadolint Dockerfile"
run .venv/bin/hadolint Dockerfile
say "no findings"

# -- 5. build context ----------------------------------------------------------------------------------
# Wheels for the base's Python: Debian bookworm's python3 is CPython 3.11 with glibc 2.36 on x86_64,
# so any manylinux_2_17..2_36 (or manylinux2014/2010/1) x86_64 wheel fits; binary wheels only.
step "build context $CTX"
mkdir -p "$CTX/wheels" "$CTX/dist"
# This machine's pip configuration adds local file indexes, some of them missing; pip warns about
# every package it looks up there. Those warnings are dropped, everything else pip says is shown.
quiet_pip() { "$@" 2> >(grep -v -E "^WARNING: Location '[^']*' is ignored: it is neither a file nor a directory\.$" >&2); }
platforms=()
for minor in $(seq 36 -1 17); do platforms+=(--platform "manylinux_2_${minor}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64)
quiet_pip run .venv/bin/python -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --implementation cp --python-version 3.11 --abi cp311 --abi abi3 --abi none "${platforms[@]}" \
  --require-hashes -r requirements.lock -d "$CTX/wheels"
# Drop wheels of versions that are no longer in the lock (the directory is kept between runs, so an
# unchanged set of files keeps podman's layer cache).
.venv/bin/python - "$CTX/wheels" requirements.lock <<'PY'
import re, sys
from pathlib import Path
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
pins = set()
for line in Path(sys.argv[2]).read_text().splitlines():
    m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", line)
    if m:
        pins.add((norm(m.group(1)), m.group(2)))
for whl in Path(sys.argv[1]).glob("*.whl"):
    name, version = whl.name.split("-")[:2]
    if (norm(name), version) not in pins:
        print(f"    removing {whl.name} (not in requirements.lock)")
        whl.unlink()
PY
say "$(find "$CTX/wheels" -name '*.whl' | wc -l) dependency wheels, $(du -sh "$CTX/wheels" | cut -f1)"

# The project's wheel, built on the host. SOURCE_DATE_EPOCH (the last commit) makes it byte-identical
# while the sources are unchanged; it replaces the staged one only when it differs.
rm -rf "$WORK/dist.new"
SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null || echo 315532800) \
  quiet_pip run .venv/bin/python -m pip wheel --quiet --disable-pip-version-check --no-deps -w "$WORK/dist.new" .
new_wheel=$(find "$WORK/dist.new" -name 'neutrowatch-*.whl' | head -n1)
[ -n "$new_wheel" ] || die "pip wheel produced no neutrowatch wheel"
staged="$CTX/dist/$(basename "$new_wheel")"
if [ -f "$staged" ] && cmp -s "$new_wheel" "$staged"; then
  say "project wheel unchanged: $(basename "$staged")"
else
  find "$CTX/dist" -name '*.whl' -delete
  cp "$new_wheel" "$staged"
  say "project wheel: $(basename "$staged")"
fi
rm -rf "$WORK/dist.new"

# The files the Dockerfile copies besides the wheels (same paths as in the repository root).
rm -rf "$CTX/service" "$CTX/config"
mkdir -p "$CTX/config"
cp -p Dockerfile requirements.lock pyproject.toml README.md "$CTX/"
cp -p config/default.yaml "$CTX/config/"
tar -c --exclude=__pycache__ --exclude='*.py[cod]' service | tar -C "$CTX" -x
rm -f "$CTX/.dockerignore" "$CTX/.containerignore"

# -- 6. build --------------------------------------------------------------------------------------------
VERSION=$(.venv/bin/python -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
REVISION=$(git rev-parse HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD 2>/dev/null || REVISION="$REVISION-dirty"
SOURCE_URL=$(git remote get-url origin 2>/dev/null || echo unknown)
step "podman build $IMAGE (version $VERSION, no network)"
old_id=$(podman image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
t=$SECONDS
run podman build --network none --pull=never --layers \
  --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg VERSION="$VERSION" \
  --build-arg REVISION="$REVISION" --build-arg SOURCE_URL="$SOURCE_URL" \
  -t "$IMAGE" -f "$CTX/Dockerfile" "$CTX"
say "built in $((SECONDS - t))s"
new_id=$(podman image inspect --format '{{.Id}}' "$IMAGE")
if [ -n "$old_id" ] && [ "$old_id" != "$new_id" ]; then
  # The previous build of this tag, now untagged: removed so that repeated runs do not pile up images.
  if podman rmi "$old_id" >/dev/null 2>&1; then say "removed the previous build ${old_id:0:12}"; fi
fi

# -- 7. checks -------------------------------------------------------------------------------------------
http_status() {  # http_status URL -> the status code, or 000 when nothing answers
  python3 - "$1" <<'PY'
import sys, urllib.error, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=3) as r:
        print(r.status)
except urllib.error.HTTPError as e:
    print(e.code)
except Exception:
    print("000")
PY
}
wait_for_status() {  # wait_for_status URL WANT WHAT
  local url=$1 want=$2 what=$3 deadline=$((SECONDS + TIMEOUT)) got=000
  while [ "$SECONDS" -lt "$deadline" ]; do
    if [ "$(podman inspect --format '{{.State.Running}}' "$CTR" 2>/dev/null)" != true ]; then
      die "$what: the container stopped (exit code $(podman inspect --format '{{.State.ExitCode}}' "$CTR" 2>/dev/null))"
    fi
    got=$(http_status "$url")
    [ "$got" = "$want" ] && { say "$what: GET $url -> $got after $((SECONDS - started))s"; return 0; }
    sleep 1
  done
  die "$what: GET $url answered $got, not $want, within ${TIMEOUT}s"
}

step "check: replay --help"
out=$(podman run --rm "$IMAGE" replay --help 2>&1) || { echo "$out" >&2; die "replay --help failed"; }
grep -q '^usage: neutrowatch replay' <<<"$out" || { echo "$out" >&2; die "replay --help printed no usage"; }
say "ok: $(head -n1 <<<"$out")"
out=$(podman run --rm --read-only --read-only-tmpfs=false -e NEUTROWATCH_FHIR__BASE_URL=https://fhir.example.org/r4 "$IMAGE" check-config 2>&1) \
  || { echo "$out" >&2; die "check-config failed"; }
say "check-config: $out"

step "check: image configuration"
user=$(podman image inspect --format '{{.Config.User}}' "$IMAGE")
[ "$user" = 10001:10001 ] || die "image user is '$user', not 10001:10001"
say "user $user; entrypoint $(podman image inspect --format '{{json .Config.Entrypoint}} cmd {{json .Config.Cmd}}' "$IMAGE")"
say "volumes $(podman image inspect --format '{{json .Config.Volumes}}' "$IMAGE"); ports $(podman image inspect --format '{{json .Config.ExposedPorts}}' "$IMAGE")"
for label in title description source licenses version revision; do
  value=$(podman image inspect --format "{{index .Config.Labels \"org.opencontainers.image.$label\"}}" "$IMAGE")
  [ -n "$value" ] || die "label org.opencontainers.image.$label is missing"
  say "org.opencontainers.image.$label=$value"
done

step "check: no compiler, pip, pip cache or build files in the image"
# -i: the check is a script on stdin. Its last line is the proof that it ran.
out=$(podman run --rm -i --read-only --read-only-tmpfs=false --entrypoint python "$IMAGE" - 2>&1 <<'PY'
import importlib.util, os, shutil, sys
problems = []
for tool in ("gcc", "cc", "c++", "g++", "clang", "make", "ld", "pip", "pip3"):
    if shutil.which(tool):
        problems.append(f"{tool} on PATH: {shutil.which(tool)}")
for module in ("pip", "setuptools"):
    if importlib.util.find_spec(module) is not None:
        problems.append(f"{module} importable by the service's Python")
for path in ("/root/.cache", "/var/lib/neutrowatch/.cache", "/src", "/tmp/dist", "/wheels"):
    if os.path.exists(path):
        problems.append(f"{path} exists")
for top in ("/opt", "/etc/neutrowatch", "/var/lib/neutrowatch", "/tmp", "/root"):
    for dirpath, _, filenames in os.walk(top):
        problems += [f"{dirpath}/{f}" for f in filenames if f.endswith((".whl", ".tar.gz", ".c", ".o"))]
import service
print(f"    python {sys.version.split()[0]} at {sys.executable}; service from {os.path.dirname(service.__file__)}")
if problems:
    print("\n".join("    found: " + p for p in problems))
    sys.exit(1)
print("    ok: no gcc/cc/make, no pip or setuptools, no pip cache, no wheels or build trees")
PY
) || { echo "$out" >&2; die "the final image carries build tools or leftovers"; }
grep -q '^    ok: ' <<<"$out" || { echo "$out" >&2; die "the leftovers check did not run"; }
echo "$out"

step "check: run against the test FHIR engine (read-only root, uid 10001)"
: >"$WORK/engine.out"
node tests/fhir_server/server.mjs --port 0 --host 127.0.0.1 >"$WORK/engine.out" 2>"$WORK/engine.err" &
ENGINE_PID=$!
deadline=$((SECONDS + 30))
until grep -q '^LISTENING ' "$WORK/engine.out"; do
  kill -0 "$ENGINE_PID" 2>/dev/null || die "the FHIR engine exited: $(tail -n 5 "$WORK/engine.err")"
  [ "$SECONDS" -lt "$deadline" ] || die "the FHIR engine did not report LISTENING within 30s"
  sleep 0.2
done
FHIR=$(sed -n 's/^LISTENING //p' "$WORK/engine.out" | head -n1)
say "FHIR engine (pid $ENGINE_PID) at $FHIR"
# A few synthetic patients (CBC panels, some through a chemotherapy nadir) so the first poll has
# something to decide and write.
.venv/bin/python - "$FHIR" <<'PY'
import sys
from tests.synthetic import PopulationSpec, generate
from tests.fhir_server.load import put_all
n = put_all(sys.argv[1], list(generate(PopulationSpec(patients=8, seed=1, corrections=0.0))))
print(f"    loaded {n} synthetic resources (8 patients)")
PY
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
run podman volume create "$VOLUME" >/dev/null
# --network host: the container reaches the engine on the host's loopback and serves its port there.
# --read-only-tmpfs=false: no tmpfs on /tmp, /var/tmp or /run either, as under Docker or Kubernetes
# with readOnlyRootFilesystem; the only writable place is the volume.
run podman run -d --name "$CTR" --read-only --read-only-tmpfs=false --network host \
  --cap-drop=all --security-opt=no-new-privileges \
  -v "$VOLUME:/var/lib/neutrowatch" \
  -e NEUTROWATCH_WEB__HOST=127.0.0.1 -e NEUTROWATCH_WEB__PORT="$PORT" \
  -e NEUTROWATCH_FHIR__BASE_URL="$FHIR" -e NEUTROWATCH_FHIR__ALLOW_INSECURE_HTTP=true \
  -e NEUTROWATCH_POLL__INTERVAL_SECONDS=2 -e NEUTROWATCH_LOGGING__FORMAT=json \
  "$IMAGE" >/dev/null
started=$SECONDS
wait_for_status "http://127.0.0.1:$PORT/healthz" 200 "liveness"
wait_for_status "http://127.0.0.1:$PORT/readyz" 200 "readiness (first poll done)"
flag_count() {
  python3 - "$FHIR" <<'PY'
import json, sys, urllib.request
with urllib.request.urlopen(f"{sys.argv[1]}/Flag?_summary=count", timeout=10) as r:
    print(json.load(r).get("total", 0))
PY
}
deadline=$((SECONDS + TIMEOUT))
until flags=$(flag_count) && [ "$flags" -gt 0 ]; do
  [ "$SECONDS" -lt "$deadline" ] || die "the service wrote no Flag to the engine within ${TIMEOUT}s"
  sleep 1
done
say "the service wrote $flags Flags to the engine"
metrics=$(http_status "http://127.0.0.1:$PORT/metrics")
[ "$metrics" = 200 ] || die "GET /metrics answered $metrics"
say "GET /metrics -> 200"

uid=$(podman exec "$CTR" id -u) gid=$(podman exec "$CTR" id -g)
if [ "$uid" != 10001 ] || [ "$gid" != 10001 ]; then die "the service runs as uid $uid gid $gid, not 10001:10001"; fi
say "runs as uid $uid gid $gid ($(podman exec "$CTR" id -un))"
if podman exec "$CTR" sh -c 'touch /x' 2>/dev/null; then die "the root filesystem is writable (/x)"; fi
if podman exec "$CTR" sh -c 'touch /tmp/x' 2>/dev/null; then die "/tmp is writable"; fi
say "root filesystem read-only: touch /x and /tmp/x refused"
podman exec "$CTR" sh -c 'test -s /var/lib/neutrowatch/state.sqlite3' || die "no SQLite state in the volume"
say "state in the volume: $(podman exec "$CTR" ls -ln /var/lib/neutrowatch | tail -n +2 | awk '{print $3":"$4, $5, $9}' | paste -sd' ' -)"
podman stop -t 10 "$CTR" >/dev/null
code=$(podman inspect --format '{{.State.ExitCode}}' "$CTR")
[ "$code" = 0 ] || die "the service exited with $code on SIGTERM"
say "stopped on SIGTERM with exit code 0"

step "image size"
podman images --format '{{.Repository}}:{{.Tag}} {{.ID}} {{.Size}}' | grep -E "^($IMAGE|$BASE_IMAGE) " | sed 's/^/    /'
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
base_size=$(podman image inspect --format '{{.Size}}' "$BASE_IMAGE")
say "$IMAGE: $((size / 1000000)) MB ($(((size - base_size) / 1000000)) MB over the base)"
