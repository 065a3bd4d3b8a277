#!/usr/bin/env bash
# Start the PyTriton dev server for the audio encoder on 127.0.0.1 (creates .venv-triton if needed).
#   infra/triton/serve.sh --http-port 8000 --grpc-port 8001 [--model tiny] [--checkpoint DIR] ...
# Options: python -m services.audio_encoder.triton_server --help. Stop it with Ctrl-C or SIGTERM.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV_TRITON=${VENV_TRITON:-.venv-triton}
bash infra/triton/setup.sh
# Triton's Python-backend stub embeds libpython: it must find the interpreter's own copy.
libdir=$("$VENV_TRITON/bin/python" -c "import sysconfig; print(sysconfig.get_config_var('LIBDIR') or '')")
export LD_LIBRARY_PATH="${libdir}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$VENV_TRITON/bin/python" -m services.audio_encoder.triton_server "$@"
