# AutoCode: one image for `autocode serve` and `autocode worker` (compose.yaml starts both, and Redis).
#
# The base image is a build argument: any Debian bookworm image with python3 (3.11) and the venv module. Where no
# registry can be reached, build one from Debian packages with deploy/make-base-image.sh and pass
#   --build-arg BASE_IMAGE=autocode-base:bookworm
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# bubblewrap: used only when the container may create namespaces (see README, "Container deployment");
# libseccomp2: the sandbox's seccomp filter (pyseccomp); procps: `kill` (ending a run's processes); curl: the
# health check; tini: PID 1.
# python3-venv is installed only when the base lacks a venv-capable python3 (the python:*-slim images have one).
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends bubblewrap libseccomp2 ca-certificates curl procps tini; \
    if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then \
        apt-get install -y --no-install-recommends python3 python3-venv; \
    fi; \
    rm -rf /var/lib/apt/lists/*

# The interpreter the sandboxed steps run lives in /opt/autocode, readable by the sandbox's uids (not under /root).
RUN python3 -m venv /opt/autocode
ENV PATH=/opt/autocode/bin:$PATH

WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY agent_core ./agent_core
COPY bots ./bots
COPY tools ./tools
COPY storage ./storage
# deploy/wheels/: optional wheels (`pip wheel . -w deploy/wheels`) for a build without the package index; with
# --build-arg PIP_OFFLINE=1 only they are used (deploy/smoke.sh builds that way: see bench/RESULTS.md).
COPY deploy/wheels/ /wheels/
ARG PIP_OFFLINE=
RUN set -eux; \
    if [ -n "$PIP_OFFLINE" ]; then pip install --no-index --find-links /wheels --no-compile /src; \
    else pip install --find-links /wheels --no-compile /src; fi; \
    rm -rf /wheels /src/build

# /data: the SQLite database and the conversations' files beside it (a volume in compose.yaml). 0700: the
# sandbox's uids must not read the database. The runs' working directories stay in /tmp (per run, thrown away).
RUN mkdir -p /data && chmod 0700 /data
WORKDIR /data
ENV AUTOCODE_DB=/data/autocode.db \
    PORT=3000
VOLUME ["/data"]
EXPOSE 3000

HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD curl -fsS "http://127.0.0.1:${PORT}/healthz" >/dev/null || exit 1

# tini: signals reach autocode (graceful shutdown), and leftover sandbox processes are reaped.
ENTRYPOINT ["/usr/bin/tini", "--", "autocode"]
CMD ["serve"]
