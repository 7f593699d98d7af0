# neutrowatch service image. Built and run in CI by the deployment issue (make image-test).
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
# Wheels are downloaded on the host into ./wheels when the build has no registry access.
COPY wheels* ./wheels/
RUN python3 -m venv /opt/neutrowatch \
 && if ls wheels/*.whl >/dev/null 2>&1; then \
      /opt/neutrowatch/bin/pip install --no-cache-dir --no-index --find-links wheels . ; \
    else \
      /opt/neutrowatch/bin/pip install --no-cache-dir . ; \
    fi

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="neutrowatch" \
      org.opencontainers.image.description="FHIR neutropenia monitor: ANC, episodes, Flag and Communication alerts" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/neutrowatch /opt/neutrowatch
COPY config /etc/neutrowatch
ENV PATH=/opt/neutrowatch/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NEUTROWATCH_CONFIG=/etc/neutrowatch/default.yaml \
    NEUTROWATCH_STORE__PATH=/var/lib/neutrowatch/state.sqlite3 \
    TMPDIR=/var/lib/neutrowatch/tmp
USER 10001:10001
VOLUME ["/var/lib/neutrowatch"]
EXPOSE 8080
ENTRYPOINT ["python", "-m", "service"]
CMD ["run"]
