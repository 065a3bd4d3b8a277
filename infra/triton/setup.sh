#!/usr/bin/env bash
# Create (or bring up to date) the separate Triton venv, .venv-triton, from infra/triton/requirements.txt.
#
# Why separate: nvidia-pytriton (which bundles a real tritonserver binary that runs on CPU) pins
# numpy<2, while the main venv (.venv) uses numpy 2. The Triton venv runs only
# services/audio_encoder/triton_server.py (tests and local trials); the worker's client side
# (tritonclient[http]) lives in the main venv.
#
# Safe to run again: it reinstalls only when requirements.txt changed (stamp file in the venv).
# Env: VENV_TRITON (default .venv-triton), PYTHON (default python3.11, else python3).
set -euo pipefail
cd "$(dirname "$0")/../.."

VENV_TRITON=${VENV_TRITON:-.venv-triton}
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
REQ=infra/triton/requirements.txt

if [ ! -x "$VENV_TRITON/bin/python" ]; then
  echo "triton setup: creating $VENV_TRITON"
  "$PYTHON" -m venv "$VENV_TRITON"
fi
stamp="$VENV_TRITON/.installed-$(sha1sum "$REQ" | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "triton setup: pip install -r $REQ into $VENV_TRITON"
  "$VENV_TRITON/bin/python" -m pip install -q --upgrade pip
  # torch first and pinned, so nothing pulls a multi-GB CUDA build.
  "$VENV_TRITON/bin/python" -m pip install -q "$(grep -E '^torch==' "$REQ")"
  "$VENV_TRITON/bin/python" -m pip install -q -r "$REQ"
  rm -f "$VENV_TRITON"/.installed-*
  touch "$stamp"
fi
