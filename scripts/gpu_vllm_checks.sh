#!/usr/bin/env bash
# The vLLM-on-GPU checks of issue 8, on the GPU machine, after vLLM 0.26 and the base wheels
# were staged and installed (bash ../shared/device/stage.sh base vllm; see ../shared/device):
#
#     export PYTHONPATH=/root/site:$PWD && bash scripts/gpu_vllm_checks.sh align|train|bench
#
#   align  align-check --engine vllm (bf16 vLLM vs the bf16 DeepSpeed trainer) on the tiny and
#          the mid-size preset, random-init, arithmetic prompts; mid again with routing replay
#   train  configs/gpu-tiny-vllm.yaml: GRPO with vLLM rollouts, colocated on one GPU (carry
#          runs/tiny-arith-sft and runs/data from a CPU run of the main job)
#   bench  benchmarks/rollout.py (vLLM + plugin vs the native engine, mid preset)
# Logs and tables go to $OUT (default /tmp/ring-rl-gpu); each step's tail is printed.
set -uo pipefail
OUT="${OUT:-/tmp/ring-rl-gpu}"
mkdir -p "$OUT"
W=/tmp/ring-rl-gpu-work
mkdir -p "$W"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
py=python3
cli() { "$py" -m ring_rl.cli "$@"; }

step() {  # step NAME CMD...: run, log to $OUT/NAME.log, print the tail and the time
  local name=$1; shift
  local t0=$SECONDS
  "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "=== $name: rc=$rc, $((SECONDS - t0)) s"
  grep -vE "INFO|WARNING|Warning|it/s\]|^\s*$" "$OUT/$name.log" | tail -n "${TAIL:-25}"
  return $rc
}

data() { [ -f "$W/data/test.jsonl" ] || cli data arith --out "$W/data" >/dev/null; }

case "${1:-}" in
  align)
    data
    cli init-model --preset tiny --out "$W/tiny" >/dev/null
    step align_tiny cli align-check --engine vllm --device cuda --model "$W/tiny" --rollout-dtype bf16 \
      --trainer-bf16 --data "$W/data/test.jsonl" --prompts 64 --max-new-tokens 32 --temperature 1.0 \
      --top-k 50 --out "$OUT/align_tiny"
    cli init-model --preset mid --out "$W/mid" >/dev/null
    step align_mid cli align-check --engine vllm --device cuda --model "$W/mid" --rollout-dtype bf16 \
      --trainer-bf16 --data "$W/data/test.jsonl" --prompts 64 --max-new-tokens 32 --temperature 1.0 \
      --top-k 50 --out "$OUT/align_mid" --no-report
    step align_mid_replay cli align-check --engine vllm --device cuda --model "$W/mid" --rollout-dtype bf16 \
      --trainer-bf16 --routing-replay --data "$W/data/test.jsonl" --prompts 64 --max-new-tokens 32 \
      --temperature 1.0 --top-k 50 --out "$OUT/align_mid_replay" --no-report
    ;;
  train)  # carry runs/tiny-arith-sft (else the SFT warm-up runs first, minutes on the CPU)
    step train cli train --config configs/gpu-tiny-vllm.yaml run.dir="$W/gpu-tiny-vllm"
    cp "$W/gpu-tiny-vllm/metrics.jsonl" "$OUT/train_metrics.jsonl" 2>/dev/null
    cp "$W/gpu-tiny-vllm/report.html" "$OUT/train_report.html" 2>/dev/null
    ;;
  bench)
    TAIL=12 step rollout_bench "$py" benchmarks/rollout.py "${@:2}"
    ;;
  *)
    echo "usage: $0 align|train|bench" >&2; exit 2 ;;
esac
