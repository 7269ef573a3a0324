#!/usr/bin/env bash
# The main job on the embedded default: synthetic arithmetic data, a tiny Ring-linear
# checkpoint trained by SFT (cached), then GRPO on local Ray with DeepSpeed on CPU.
# Extra arguments go to `ring-rl train` (e.g. run.steps=10, --resume).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec ring-rl train --config configs/tiny-arith.yaml "$@"
