# neutrowatch service image. Checked in CI by scripts/image_test.sh (make image-test).
#
# Two ways to build it:
#
# * Offline, as CI does (scripts/image_test.sh): the build has no registry access (podman build
#   --network none). The context is a staging directory (build/image/context) that holds, besides
#   the files named below, wheels/ with every wheel of requirements.lock (pip download on the host)
#   and dist/ with the project's own wheel (pip wheel --no-deps on the host); the base is a local
#   Debian bookworm image (--build-arg BASE_IMAGE=localhost/neutrowatch-base:bookworm).
#       bash scripts/image_test.sh
#
# * From the repository root on a machine with registry access, with the default base:
#       docker build -t neutrowatch .        (or podman build)
#   There is no wheels/ or dist/ in the root (.dockerignore keeps them out anyway), so the build
#   stage installs requirements.lock from the index (hashes checked, binary wheels only) and builds
#   the project's wheel from the copied sources.
#
# Either way the dependencies come from requirements.lock only, pinned with hashes, and the project
# is installed with --no-deps from a wheel. Whatever base is used must provide python3 (3.11) with
# the venv module; the final stage copies only the virtualenv and the config onto that same base.
ARG BASE_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1
WORKDIR /src

# Dependencies first (their layer is reused while the lock file and the wheels are unchanged).
# "wheel[s]" is optional: a pattern that matches nothing is accepted next to a file that exists
# (buildah and Docker alike), and a matched directory's contents are copied, so /src/wheels ends up
# with requirements.lock plus, when the context has them, the downloaded wheels.
COPY requirements.lock wheel[s] /src/wheels/
RUN python3 -m venv /opt/neutrowatch \
 && set -- /src/wheels/*.whl \
 && if [ -e "$1" ]; then \
      echo "installing requirements.lock from the context's wheels (no index)" && \
      /opt/neutrowatch/bin/python -m pip install --no-cache-dir --no-index --find-links /src/wheels \
        --only-binary=:all: --require-hashes -r /src/wheels/requirements.lock; \
    else \
      echo "no wheels in the context: installing requirements.lock from the package index" && \
      /opt/neutrowatch/bin/python -m pip install --no-cache-dir \
        --only-binary=:all: --require-hashes -r /src/wheels/requirements.lock; \
    fi

# The project itself, with --no-deps, from a wheel: the one in the context's dist/ when there is one,
# else one built here from the sources (that needs the index for setuptools). Then pip and setuptools
# leave the virtualenv: the runtime needs neither, and the final image can install nothing.
COPY pyproject.toml README.md dis[t] /src/project/
COPY service /src/project/service
RUN set -- /src/project/neutrowatch-*.whl \
 && if [ ! -e "$1" ]; then \
      echo "no project wheel in the context: building it from the sources" && \
      /opt/neutrowatch/bin/python -m pip wheel --no-cache-dir --no-deps -w /tmp/dist /src/project && \
      set -- /tmp/dist/neutrowatch-*.whl; \
    fi \
 && /opt/neutrowatch/bin/python -m pip install --no-cache-dir --no-index --no-deps "$1" \
 && /opt/neutrowatch/bin/python -m pip check \
 && /opt/neutrowatch/bin/python -m pip uninstall --yes --quiet pip setuptools \
 && rm -rf /tmp/dist

# ---------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE}
# A named user for the numeric uid (so `id`, ps and file listings show a name); no home directory
# of its own, no login shell, no lastlog entry (--no-log-init: a high uid would make a huge sparse lastlog).
RUN groupadd --gid 10001 neutrowatch \
 && useradd --no-log-init --uid 10001 --gid 10001 --no-create-home \
      --home-dir /var/lib/neutrowatch --shell /usr/sbin/nologin neutrowatch \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/neutrowatch

COPY --from=build /opt/neutrowatch /opt/neutrowatch
COPY config/default.yaml /etc/neutrowatch/default.yaml

# Everything the process writes goes to the volume, so the root filesystem can be mounted read-only:
# the SQLite state and temporary files (TMPDIR is the volume itself, which always exists, also when a
# tmpfs or an emptyDir is mounted there). No .pyc files are written at run time.
ENV PATH=/opt/neutrowatch/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/var/lib/neutrowatch \
    TMPDIR=/var/lib/neutrowatch \
    NEUTROWATCH_CONFIG=/etc/neutrowatch/default.yaml \
    NEUTROWATCH_STORE__PATH=/var/lib/neutrowatch/state.sqlite3
WORKDIR /var/lib/neutrowatch
USER 10001:10001
VOLUME ["/var/lib/neutrowatch"]
# /healthz, /readyz, /metrics (web.port)
EXPOSE 8080
ENTRYPOINT ["python", "-m", "service"]
CMD ["run"]

# Last, so that a new revision or version changes no layer above.
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE_URL=unknown
LABEL org.opencontainers.image.title="neutrowatch" \
      org.opencontainers.image.description="FHIR R4 neutropenia monitor: ANC, episodes, Flag and Communication alerts" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
