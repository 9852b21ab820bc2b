# One image for every Usher service. The service is the CMD:
#
#   docker build -t usher:dev .
#   docker run --rm usher:dev services.scheduler      # default
#   docker run --rm usher:dev services.pool
#   docker run --rm usher:dev services.notifier
#   docker run --rm usher:dev services.gateway
#
# Settings are environment variables (see deploy/README.md). Ports: 50051 scheduler,
# 50052 pool, 50053 notifier, 8080 gateway (HTTP), 9090 Prometheus /metrics
# (USHER_METRICS_PORT). No HEALTHCHECK: Kubernetes probes the gRPC health service.
#
# Every runtime dependency ships binary wheels for CPython 3.11 on linux amd64 and arm64,
# so neither stage needs a compiler. If one ever does not, install build-essential in the
# build stage only; the runtime stage copies nothing but the virtual environment.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: a self-contained virtual environment in /opt/usher ----------------------------
FROM ${PYTHON_IMAGE} AS build

# PIP_NO_INDEX=1 builds offline, from the wheels in deploy/docker/wheels/ (filled on the
# host by `pip download`, as scripts/image_test.sh does); pip looks there first either way.
ARG PIP_NO_INDEX=0
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_NO_INDEX=${PIP_NO_INDEX} \
    PIP_FIND_LINKS=/wheels \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/usher/bin:$PATH

RUN python -m venv /opt/usher

WORKDIR /src

# Dependencies first, in their own layer: it is rebuilt only when pyproject.toml changes.
COPY deploy/docker/wheels/ /wheels/
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt

# Then the package itself (no dev extras). .dockerignore keeps tests, caches and venvs out.
COPY . .
RUN pip install --no-cache-dir --no-deps . \
    && pip check \
    && python deploy/docker/check_install.py /src \
    && pip uninstall --yes pip

# ---- runtime ------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown

LABEL org.opencontainers.image.title="usher" \
      org.opencontainers.image.description="Usher: fair, durable queueing and routing for a fleet of local LLM servers (scheduler, pool, notifier, gateway)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"

ENV PATH=/opt/usher/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONFAULTHANDLER=1

# A fixed, unprivileged uid/gid (Kubernetes runAsUser 10001 relies on it). No home, no shell.
RUN groupadd --system --gid 10001 usher \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin usher

COPY --from=build /opt/usher /opt/usher

# An empty working directory: `python -m` puts it first on sys.path, so nothing in it may
# shadow the installed packages. The root filesystem can be mounted read-only.
WORKDIR /app
USER 10001:10001

EXPOSE 50051 50052 50053 8080 9090

ENTRYPOINT ["python", "-m"]
CMD ["services.scheduler"]
