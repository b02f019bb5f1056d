# syntax=docker/dockerfile:1
# One image for every service in infra/: the MLflow server, the Ray head and workers, and serving.
# Each service gives its own command (infra/compose/compose.yaml, infra/k8s/). It runs as the
# non-root user 10001 and loads models pickle-free.
#
#   docker build -t mnist-pipeline:0.1.0 .
#   docker build -t mnist-pipeline:0.1.0-gpu \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#     --build-arg TORCH_VERSION=2.13.0+cu128 .
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# --- build: a virtual environment in /opt/venv, pinned by requirements.lock ---------------------
FROM ${PYTHON_IMAGE} AS builder
# torch comes from the PyTorch index (CPU wheels by default; a CUDA variant for the GPU image).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0+cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app

# Dependencies first, so that a source change does not reinstall them: torch, then the project's
# dependencies and its `cloud` extra (dvc-s3, boto3, psycopg 3, Flask-WTF) from PyPI, constrained
# by requirements.lock (less its torch line, which names the CPU build).
COPY pyproject.toml requirements.lock ./
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
 && grep -v '^torch==' requirements.lock > /tmp/constraints.txt \
 && python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['cloud']))" > /tmp/requirements.txt \
 && pip install -c /tmp/constraints.txt -r /tmp/requirements.txt

# The project itself, installed in place (services/serving/static must stay beside its module).
COPY README.md ./
COPY pipeline ./pipeline
COPY services ./services
RUN pip install --no-deps -e .

# --- runtime -----------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/app \
    MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false \
    SERVING_CACHE_DIR=/tmp/serving-cache
# pipeline/training/ray_env.py TRAINING_ENV: training processes keep freed memory (no page-fault storm)
ENV MALLOC_MMAP_THRESHOLD_=33554432 \
    MALLOC_TRIM_THRESHOLD_=4294967296 \
    MALLOC_ARENA_MAX=1
RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/app --create-home \
      --shell /usr/sbin/nologin app \
 && mkdir -p /shared \
 && chown 10001:10001 /shared
COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
# Source and recipes stay root-owned: the app user reads them, Ray jobs work in their own copy.
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY services ./services
COPY infra ./infra
COPY params.yaml dvc.yaml ./

USER 10001:10001
# MLflow 5000, serving 8000, Ray GCS 6379, Ray dashboard and Jobs API 8265, Ray client 10001.
EXPOSE 5000 8000 6379 8265 10001
CMD ["mnist-pipeline", "--help"]
