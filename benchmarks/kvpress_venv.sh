#!/usr/bin/env bash
# Create (once) the separate venv that runs kvpress 0.5.5 for `make bench`, and print its python's path.
#
# kvpress 0.5.5 pins transformers>=4.56,<5.3 while PolyKV uses transformers 5.x, so it cannot share .venv.
# The venv lives outside the repository, under ${POLYKV_CACHE:-${XDG_CACHE_HOME:-~/.cache}/polykv}/bench-venvs/kvpress.
# It is complete once its .installed marker exists; a failed install leaves no marker and is retried next time.
#
#   bash benchmarks/kvpress_venv.sh            # create if missing; prints the python path on the last line
#   KVPRESS_VENV=/some/dir bash benchmarks/kvpress_venv.sh
set -euo pipefail

PYTHON=${PYTHON:-python3}
ROOT=${POLYKV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/polykv}
VENV=${KVPRESS_VENV:-$ROOT/bench-venvs/kvpress}

if [ ! -f "$VENV/.installed" ]; then
  echo "kvpress_venv: creating $VENV (torch 2.13.0 CPU, kvpress 0.5.5; takes a few minutes once)" >&2
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip >&2
  # torch first, pinned to the CPU build on this machine's disk, so kvpress's resolution does not pick another one
  "$VENV/bin/pip" install -q torch==2.13.0 >&2
  "$VENV/bin/pip" install -q torch==2.13.0 kvpress==0.5.5 gguf accelerate >&2
  "$VENV/bin/python" -c "import kvpress, transformers, torch; print('kvpress_venv: kvpress', kvpress.__name__, 'transformers', transformers.__version__, 'torch', torch.__version__)" >&2
  touch "$VENV/.installed"
fi
echo "$VENV/bin/python"
