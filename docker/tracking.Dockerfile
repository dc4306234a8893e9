# The MLflow tracking server of the compose stack: the wsimil-base environment plus the S3
# client MLflow needs to proxy artifacts to MinIO (boto3 is not in requirements.lock; these
# pins resolve against it: `uv pip compile` of boto3 with `-c requirements.lock`).
# Build wsimil-base first:  docker build -f docker/base.Dockerfile -t wsimil-base .
ARG BASE_IMAGE=wsimil-base
FROM ${BASE_IMAGE}
USER root
RUN uv pip install --python /opt/venv/bin/python --no-cache -c requirements.lock \
        boto3==1.44.5 botocore==1.44.5 s3transfer==0.19.3 jmespath==1.1.0
USER wsimil
