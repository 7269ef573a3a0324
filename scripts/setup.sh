#!/usr/bin/env bash
# Make (or refresh) the project's virtual environment in .venv. Sourced by the other
# scripts; needs only Python 3.11 and pip. Re-runs pip only when pyproject.toml changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RING_RL_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.ring-rl-installed"
want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing ring-rl and its dependencies into $VENV (a few minutes the first time)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch first and pinned: the CPU build (a bare `torch` would pull a multi-GB CUDA build),
  # and deepspeed's setup.py imports it while building without compiling ops.
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  DS_BUILD_OPS=0 "$VENV/bin/python" -m pip install -q -e "$ROOT[dev]"
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
