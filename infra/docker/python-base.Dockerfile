# syntax=docker/dockerfile:1.7
# Shared base of the LiveAvatar CPU images (session-api, audio-encoder, stream-packager, lane-controller,
# and the lane in the tiny CPU profile): Python 3.11 slim, the CPU build of torch, the project installed
# from pyproject.toml, a non-root user (uid/gid 10001). Model weights are never copied in: they are
# mounted at /models at run time.
#
# Build (skaffold does this for you; build context is the repository root):
#   docker build -f infra/docker/python-base.Dockerfile -t liveavatar/python-base .
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# 1. torch first, from the CPU index, so no multi-GB CUDA build is pulled in.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
# 2. The project's dependencies, read from pyproject.toml (a layer that only changes with pyproject.toml).
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt
# 3. The project itself (no dependency resolution left to do).
COPY models ./models
COPY pipeline_stages ./pipeline_stages
COPY services ./services
COPY infra ./infra
RUN pip install --no-deps . && python -c "import models, pipeline_stages, services"

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    HF_HOME=/tmp/.cache/huggingface \
    HF_HUB_OFFLINE=1 \
    TORCHINDUCTOR_CACHE_DIR=/tmp/.cache/torchinductor \
    LIVEAVATAR_MODEL_DIR=/models \
    LIVEAVATAR_JSON_LOGS=true
RUN groupadd --system --gid 10001 liveavatar \
    && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --shell /usr/sbin/nologin liveavatar \
    && mkdir -p /models
COPY --from=build /opt/venv /opt/venv
WORKDIR /tmp
USER 10001:10001
