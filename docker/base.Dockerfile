# The locked wsimil environment on a CUDA runtime base.
# Build from the repository root:  docker build -f docker/base.Dockerfile -t wsimil-base .
# No Docker engine runs on the development machines; the install steps below are the ones
# `make install` runs (and CI tests) outside Docker.
FROM nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    UV_PYTHON_INSTALL_DIR=/opt/python \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=1 \
    DVC_NO_ANALYTICS=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false
RUN apt-get update && apt-get install -y --no-install-recommends git make ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=ghcr.io/astral-sh/uv:0.13.8 /uv /usr/local/bin/uv

RUN useradd --create-home --uid 10001 wsimil
WORKDIR /opt/wsimil
COPY requirements.lock pyproject.toml README.md ./
COPY wsimil ./wsimil
# Python 3.11 (the version the lock is resolved for), then the lock, then the package
# without dependencies so nothing can swap torch.
RUN uv venv --python 3.11 /opt/venv \
    && uv pip install --python /opt/venv/bin/python --no-cache -r requirements.lock \
    && uv pip install --python /opt/venv/bin/python --no-cache --no-deps . \
    && chmod -R a+rX /opt/python /opt/venv
ENV PATH=/opt/venv/bin:$PATH
USER wsimil
