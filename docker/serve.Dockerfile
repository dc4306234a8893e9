# The serving image: `mlflow models serve` of a registered wsimil model on a CUDA runtime.
# Build from the repository root:  docker build -f docker/serve.Dockerfile -t wsimil-serve .
# Run (the model comes from the tracking server, which proxies its artifacts):
#   docker run --gpus all -p 5001:5001 -e MLFLOW_TRACKING_URI=http://<tracking>:5000 \
#     -e MODEL_URI=models:/wsimil-dtfd@champion wsimil-serve
# No Docker engine runs on the development machines. The install steps are the ones of
# base.Dockerfile and `make install`, and the command is the one tests/test_serve.py starts
# outside Docker (`--env-manager local`: this locked environment is the model's environment).
FROM nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    UV_PYTHON_INSTALL_DIR=/opt/python \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=1
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=ghcr.io/astral-sh/uv:0.13.8 /uv /usr/local/bin/uv

RUN useradd --create-home --uid 10001 wsimil
WORKDIR /opt/wsimil
COPY requirements.lock pyproject.toml README.md ./
COPY wsimil ./wsimil
# Python 3.11, the lock, then the package without dependencies so nothing can swap torch.
RUN uv venv --python 3.11 /opt/venv \
    && uv pip install --python /opt/venv/bin/python --no-cache -r requirements.lock \
    && uv pip install --python /opt/venv/bin/python --no-cache --no-deps . \
    && chmod -R a+rX /opt/python /opt/venv

# The venv's bin on PATH: `mlflow models serve` starts uvicorn through the shell.
# MODEL_URI: any MLflow model URI (models:/<name>@champion, models:/<name>/<version>, runs:/...).
# WSIMIL_SERVE_SLIDE_ROOT (unset here): mount slides read-only and set it to accept paths.
# SERVING_MODEL_CONFIG (JSON) overrides the serve settings baked in at registration.
ENV PATH=/opt/venv/bin:$PATH \
    MODEL_URI=models:/wsimil-dtfd@champion \
    PORT=5001 \
    WORKERS=1 \
    MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT=300
USER wsimil
WORKDIR /home/wsimil
EXPOSE 5001
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/ping' % os.environ['PORT'], timeout=4)"
CMD ["sh", "-c", "exec mlflow models serve -m \"$MODEL_URI\" --env-manager local -h 0.0.0.0 -p \"$PORT\" -w \"$WORKERS\""]
