# The MLflow tracking server of the compose stack: the wsimil-base environment plus the S3
# client MLflow needs to proxy artifacts to MinIO and the CSRF package of its basic-auth app
# (boto3 and Flask-WTF, MLflow's `auth` extra, are not in requirements.lock; these pins
# resolve against it: `uv pip compile` of them with `-c requirements.lock`).
# Build wsimil-base first:  docker build -f docker/base.Dockerfile -t wsimil-base .
ARG BASE_IMAGE=wsimil-base
FROM ${BASE_IMAGE}
USER root
RUN uv pip install --python /opt/venv/bin/python --no-cache -c requirements.lock \
        boto3==1.44.5 botocore==1.44.5 s3transfer==0.19.3 jmespath==1.1.0 \
        Flask-WTF==1.3.0 WTForms==3.2.2
# The basic-auth user store (volume mlflow-auth): a new volume takes this owner.
RUN mkdir -p /var/lib/mlflow-auth && chown wsimil /var/lib/mlflow-auth
USER wsimil
