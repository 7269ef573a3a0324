#!/usr/bin/env bash
# The vLLM-on-GPU checks of issue 8, on the GPU machine, after vLLM 0.26 and the base wheels
# were staged and installed (bash ../shared/device/stage.sh base vllm; see ../shared/device):
#
#     export PYTHONPATH=/root/site:$PWD && bash scripts/gpu_vllm_checks.sh align|train|bench
#
#   align  align-check --engine vllm (bf16 vLLM vs the bf16 DeepSpeed trainer) on the tiny and
#          the mid-size preset, random-init, arithmetic prompts; each again with routing replay
#   train  configs/gpu-tiny-vllm.yaml: GRPO with vLLM rollouts, colocated on one GPU (carry
#          runs/tiny-arith-sft and runs/data from a CPU run of the main job)
#   bench  benchmarks/rollout.py (vLLM + plugin vs the native engine, mid preset)
#   split  [tiny|mid] [key=value ...] two GPUs: configs/gpu-split-vllm.yaml (trainer on one GPU, vLLM on the
#          other, weights broadcast over NCCL) on the tiny SFT checkpoint (carry it as for
#          train), then the random-init mid preset with moving weights (as exact mid);
#          overrides after the part go to both runs (e.g. rollout.weight_sync=object_store)
#   exact  [tests|tiny|mid] issue 10 on the GPU: the batch-invariant kernels' GPU tests, then GRPO with vLLM
#          rollouts in alignment.mode=exact and default on the tiny SFT checkpoint (20 steps
#          each: the bitwise check every step, and the step-time cost), and exact mode on the
#          random-init mid preset (carry runs/tiny-arith-sft and runs/data as for train)
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
    step align_tiny_replay cli align-check --engine vllm --device cuda --model "$W/tiny" --rollout-dtype bf16 \
      --trainer-bf16 --routing-replay --data "$W/data/test.jsonl" --prompts 64 --max-new-tokens 32 \
      --temperature 1.0 --top-k 50 --out "$OUT/align_tiny_replay" --no-report
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
  exact)  # exact [tests|tiny|mid]: one part only (default: all three)
    part=${2:-all}
    if [ "$part" = all ] || [ "$part" = tests ]; then
      TAIL=6 step exact_gpu_tests "$py" -m pytest -q -o addopts="" -m gpu tests/kernels/test_matmul.py \
        tests/kernels/test_paged_attention.py tests/model/test_exact_ops.py
    fi
    if [ "$part" = all ] || [ "$part" = tiny ]; then
      for mode in exact default; do
        TAIL=8 step "tiny_$mode" cli train --config configs/gpu-tiny-vllm.yaml alignment.mode=$mode run.steps=20 \
          run.eval_every=0 run.checkpoint_every=0 run.dir="$W/tiny-$mode"
        "$py" scripts/summarize_metrics.py "$W/tiny-$mode/metrics.jsonl" | tee -a "$OUT/summary.txt"
        cp "$W/tiny-$mode/metrics.jsonl" "$OUT/tiny_${mode}_metrics.jsonl" 2>/dev/null
      done
    fi
    if [ "$part" = all ] || [ "$part" = mid ]; then
      [ -d "$W/mid" ] || cli init-model --preset mid --out "$W/mid" >/dev/null
      # Random-init mid earns no reward, so its policy gradient is 0: weight decay makes every
      # update move the weights anyway (lr x wd = 2e-3 of each weight per step, about half a
      # bf16 ulp, so a large share of the synced bf16 weights change every step).
      TAIL=8 step mid_exact cli train --config configs/gpu-tiny-vllm.yaml alignment.mode=exact \
        model.name_or_path="$W/mid" sft.enabled=false run.steps=20 run.prompts_per_step=8 run.eval_every=0 \
        run.checkpoint_every=0 trainer.weight_decay=0.1 trainer.lr=2e-2 trainer.lr_schedule=constant \
        trainer.warmup_steps=0 run.dir="$W/mid-exact"
      "$py" scripts/summarize_metrics.py "$W/mid-exact/metrics.jsonl" | tee -a "$OUT/summary.txt"
      cp "$W/mid-exact/metrics.jsonl" "$OUT/mid_exact_metrics.jsonl" 2>/dev/null
    fi
    ;;
  split)  # split [tiny|mid] (default: both); needs two GPUs
    part=${2:-all}
    # NVLink multicast stays off (the machine's rule; set here too in case the image lacks it)
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    if [ "$part" = all ] || [ "$part" = tiny ]; then
      TAIL=8 step split_tiny cli train --config configs/gpu-split-vllm.yaml run.dir="$W/split-tiny" "${@:3}"
      "$py" scripts/summarize_metrics.py "$W/split-tiny/metrics.jsonl" | tee -a "$OUT/summary.txt"
      cp "$W/split-tiny/metrics.jsonl" "$OUT/split_tiny_metrics.jsonl" 2>/dev/null
    fi
    if [ "$part" = all ] || [ "$part" = mid ]; then
      [ -d "$W/mid" ] || cli init-model --preset mid --out "$W/mid" >/dev/null
      TAIL=8 step split_mid cli train --config configs/gpu-split-vllm.yaml model.name_or_path="$W/mid" \
        sft.enabled=false run.steps=10 run.prompts_per_step=8 run.eval_every=0 run.checkpoint_every=0 \
        trainer.weight_decay=0.1 trainer.lr=2e-2 trainer.lr_schedule=constant trainer.warmup_steps=0 \
        run.dir="$W/split-mid" "${@:3}"
      "$py" scripts/summarize_metrics.py "$W/split-mid/metrics.jsonl" | tee -a "$OUT/summary.txt"
      cp "$W/split-mid/metrics.jsonl" "$OUT/split_mid_metrics.jsonl" 2>/dev/null
    fi
    ;;
  bench)
    TAIL=12 step rollout_bench "$py" benchmarks/rollout.py "${@:2}"
    ;;
  *)
    echo "usage: $0 align|train|bench|exact|split" >&2; exit 2 ;;
esac
