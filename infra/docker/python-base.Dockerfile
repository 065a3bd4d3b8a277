# syntax=docker/dockerfile:1.7
# Shared bases of the LiveAvatar CPU images, two targets of one file:
#   serve  core + serve + media extras, no torch: session-api, stream-packager, lane-controller, webhooks;
#   model  serve plus the CPU build of torch and the model extra: audio-encoder, and the lane in the tiny
#          CPU profile (the default target).
# Both hold the project installed from pyproject.toml and a non-root user (uid/gid 10001). Model weights are
# never copied in: they are mounted at /models at run time.
#
# Build (skaffold does this for you; build context is the repository root):
#   docker build -f infra/docker/python-base.Dockerfile --target serve -t liveavatar/python-base .
#   docker build -f infra/docker/python-base.Dockerfile --target model -t liveavatar/python-torch-base .
# Build arguments:
#   PYTHON_IMAGE      a Debian bookworm image with Python 3.11 (python:*-slim, or the locally bootstrapped
#                     base of `make images`, infra/containers/images.py)
#   TORCH_INDEX_URL   where torch comes from (the PyTorch CPU index)
#   TORCH_FIND_LINKS  a folder of wheels mounted into the build (e.g. `podman build -v /opt/wheels:/wheels:ro
#                     --build-arg TORCH_FIND_LINKS=/wheels`): torch is taken from there instead
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# Runtime: what every image has besides the virtual environment.
FROM ${PYTHON_IMAGE} AS runtime
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

# 1. An empty virtual environment (python3: Debian's own Python has no `python` command).
FROM ${PYTHON_IMAGE} AS venv
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# 2a. The serving dependencies, read from pyproject.toml (a layer that only changes with pyproject.toml; the
#     README, the package's long description, comes with the sources).
FROM venv AS deps-serve
COPY pyproject.toml infra/docker/requirements.py ./
RUN python requirements.py serve,media > /tmp/requirements.txt && pip install -r /tmp/requirements.txt

# 2b. torch first, from the CPU index (or a local wheel), so no multi-GB CUDA build is pulled in; then the
#     rest of the model dependencies.
FROM venv AS deps-model
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_FIND_LINKS=
RUN if [ -n "${TORCH_FIND_LINKS}" ]; then \
        pip install --find-links "${TORCH_FIND_LINKS}" "torch==${TORCH_VERSION}"; \
    else \
        pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"; \
    fi \
    && python -c "import torch; assert torch.version.cuda is None, 'a CUDA build of torch was installed'"
COPY pyproject.toml infra/docker/requirements.py ./
RUN python requirements.py serve,media,model --no-torch > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt

# 3. The project itself, into its own folder (no dependency resolution left to do), so that a change to the
#    sources rebuilds a small layer and never the dependencies' one.
FROM deps-serve AS build-serve
COPY README.md ./
COPY models ./models
COPY pipeline_stages ./pipeline_stages
COPY services ./services
COPY infra ./infra
RUN pip install --no-deps --target /opt/project . && rm -rf /opt/project/bin \
    && PYTHONPATH=/opt/project python -c \
        "import models, pipeline_stages, services, importlib.util as u; assert u.find_spec('torch') is None"

FROM deps-model AS build-model
COPY README.md ./
COPY models ./models
COPY pipeline_stages ./pipeline_stages
COPY services ./services
COPY infra ./infra
RUN pip install --no-deps --target /opt/project . && rm -rf /opt/project/bin \
    && PYTHONPATH=/opt/project python -c "import models, pipeline_stages, services, torch"

# 4. The images: the dependencies' layer, then the project's (Debian's and python:*-slim's Python is 3.11).
FROM runtime AS serve
COPY --from=deps-serve /opt/venv /opt/venv
COPY --from=build-serve /opt/project /opt/venv/lib/python3.11/site-packages/
WORKDIR /tmp
USER 10001:10001

FROM runtime AS model
COPY --from=deps-model /opt/venv /opt/venv
COPY --from=build-model /opt/project /opt/venv/lib/python3.11/site-packages/
WORKDIR /tmp
USER 10001:10001
