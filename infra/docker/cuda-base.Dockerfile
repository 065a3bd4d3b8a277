# syntax=docker/dockerfile:1.7
# Shared base of the LiveAvatar GPU image (lane): the NVIDIA CUDA base image, Python 3.11, torch 2.13.0
# from PyPI (its wheels bring their own CUDA libraries; the node provides the driver), the project
# installed from pyproject.toml, a non-root user (uid/gid 10001). Model weights are mounted at /models.
#
# Build (skaffold does this for you; build context is the repository root):
#   docker build -f infra/docker/cuda-base.Dockerfile -t liveavatar/cuda-base .
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu22.04

FROM ${CUDA_IMAGE} AS python
ENV DEBIAN_FRONTEND=noninteractive
# Python 3.11 on Ubuntu 22.04 comes from the deadsnakes PPA.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates gnupg software-properties-common \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && apt-get purge -y --auto-remove software-properties-common gnupg \
    && rm -rf /var/lib/apt/lists/*

FROM python AS build
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# 1. torch first (the default PyPI build is the CUDA one).
RUN pip install "torch==${TORCH_VERSION}"
# 2. The project's dependencies, read from pyproject.toml.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt
# 3. The project itself.
COPY models ./models
COPY pipeline_stages ./pipeline_stages
COPY services ./services
COPY infra ./infra
RUN pip install --no-deps . && python -c "import models, pipeline_stages, services"

FROM python
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    HF_HOME=/tmp/.cache/huggingface \
    HF_HUB_OFFLINE=1 \
    TORCHINDUCTOR_CACHE_DIR=/tmp/.cache/torchinductor \
    TRITON_CACHE_DIR=/tmp/.cache/triton \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    LIVEAVATAR_MODEL_DIR=/models \
    LIVEAVATAR_JSON_LOGS=true
RUN groupadd --system --gid 10001 liveavatar \
    && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --shell /usr/sbin/nologin liveavatar \
    && mkdir -p /models
COPY --from=build /opt/venv /opt/venv
WORKDIR /tmp
USER 10001:10001
