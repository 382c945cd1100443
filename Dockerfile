# The streamscore worker image (also runs every other `streamscore` command).
#
#   docker build -t streamscore .                                          # CPU (python:3.11-slim)
#   docker build -t streamscore:cuda --build-arg EXTRAS=gpu .              # NVIDIA GPUs (run with --gpus all)
#
# onnxruntime-gpu (a dependency in pyproject.toml) runs on CPU too. The CUDA variant adds the [gpu] extra: the
# CUDA 13 runtime and cuDNN 9 wheels onnxruntime-gpu's CUDA provider loads (so no CUDA base image is needed, and
# none whose CUDA major differs from onnxruntime-gpu's can be picked by mistake); the driver comes from the host
# (NVIDIA Container Toolkit), and STREAMSCORE_WORKER__DEVICE=auto uses the GPU (cuda: requires it). The compiled fast path is built in the build stage (a compile
# failure fails the build: there is no silent pure-Python image). The image runs as a non-root user and writes
# only to STREAMSCORE_DATA_DIR (/data): the root file system can be mounted read-only.
# tests/unit/test_dockerfile.py holds these steps to pyproject.toml (no container engine runs in CI).
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS python
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The python:* images have Python 3.11; the CUDA images have none: take the distribution's (with venv)
RUN if ! command -v python3.11 >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi

FROM python AS build
# A C compiler for the Cython fast path (and the headers, where the base has none)
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && if [ ! -f "$(python3.11 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ]; then \
           apt-get install -y --no-install-recommends python3.11-dev; \
       fi \
    && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/streamscore
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY streamscore/ streamscore/
COPY streams/ streams/
COPY fastpath/ fastpath/
COPY featurestore/ featurestore/
COPY workers/ workers/
COPY deploy/local/streamscore_stack/ deploy/local/streamscore_stack/
COPY examples/ examples/
COPY bench/ bench/
# The project and its dependencies as pyproject.toml declares them, with [batch] for `streamscore score` (the
# chart's batch-scoring CronJob); the fast path is compiled here. EXTRAS: more extras, e.g. gpu (the CUDA variant)
ARG EXTRAS=""
RUN /opt/streamscore/bin/pip install --no-cache-dir ".[batch]" \
    && if [ -n "$EXTRAS" ]; then /opt/streamscore/bin/pip install --no-cache-dir ".[batch,$EXTRAS]"; fi \
    && /opt/streamscore/bin/python -c "import streamscore.fastpath._fast"

FROM python AS runtime
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin streamscore \
    && mkdir -p /data /models /config \
    && chown 10001:10001 /data
COPY --from=build /opt/streamscore /opt/streamscore
ENV PATH=/opt/streamscore/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    STREAMSCORE_DATA_DIR=/data \
    STREAMSCORE_MODELS_DIR=/models \
    STREAMSCORE_VIEWS_FILE=/config/views.json \
    STREAMSCORE_WORKER__WEB_BIND=0.0.0.0 \
    STREAMSCORE_MONITORING__WEB_BIND=0.0.0.0 \
    STREAMSCORE_LOG_FORMAT=json
VOLUME ["/data"]
USER 10001:10001
WORKDIR /data
EXPOSE 6066
ENTRYPOINT ["streamscore"]
CMD ["worker", "--model", "fraud"]
