"""The DeepSpeed config dict and the LR schedule, built from the `trainer` config section.

Everything DeepSpeed needs to know is here, in one function, so a person can read what the
engine was told. Gradient accumulation is owned by the engine wrapper (the number of
micro-batches varies with the batch), so DeepSpeed is told one micro-batch per step and the
wrapper marks the accumulation boundary itself.
"""
from __future__ import annotations

import math
from typing import Callable

from ring_rl.config import TrainerConfig

ADAM_EPS = 1e-8


def build_ds_config(cfg: TrainerConfig, world_size: int = 1) -> dict:
    """DeepSpeed's JSON config for `cfg` (ZeRO stage, AdamW, clipping, bf16)."""
    zero: dict = {"stage": cfg.zero_stage}
    if cfg.zero_stage == 3:
        # Partition every tensor (no small ones kept whole) and fetch on demand, no prefetch:
        # the simplest, most checkable schedule (the tests then exercise every gather).
        # Performance tuning (persistence threshold, prefetch buckets) belongs to GPU runs.
        zero.update({"stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 0})
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": 1,  # the wrapper sets the boundary (variable micro-batch count)
        "train_batch_size": cfg.micro_batch_size * world_size,
        "gradient_clipping": 0.0 if clips_itself(cfg) else cfg.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": cfg.lr,
                "betas": list(cfg.adam_betas),
                "eps": ADAM_EPS,
                "weight_decay": cfg.weight_decay,  # DeepSpeed's default is 0.01: always pass it
                "torch_adam": True,  # no compiled DeepSpeed ops (DS_BUILD_OPS=0)
                # passed on to torch.optim.AdamW: one kernel over all tensors instead of six
                # passes each (CPU and CUDA; on the tiny CPU model 19 -> 10 ms a step)
                "fused": True,
            },
        },
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.bf16},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def clips_itself(cfg: TrainerConfig) -> bool:
    """Whether the engine wrapper, not DeepSpeed, takes the grad norm and clips. Without ZeRO
    and in fp32, DeepSpeed clips through a per-tensor loop and does not report the norm, so
    the wrapper took the norm a second time for its stats; one fused pass does both."""
    return cfg.zero_stage == 0 and not cfg.bf16


def lr_factor(cfg: TrainerConfig, total_steps: int | None) -> Callable[[int], float]:
    """Multiplier of `cfg.lr` for the optimizer step that has `step` steps before it.

    Linear warmup: step s < W uses (s + 1) / W (the first update is already non-zero).
    constant: 1 afterwards. cosine: from 1 down to min_lr_ratio at `total_steps`, then flat
    (a run of at most W steps is all warmup: a shortened run keeps the config's warmup).
    A plain function (not a lambda object with state) so LambdaLR's state_dict stays plain.
    """
    warmup, floor = cfg.warmup_steps, cfg.min_lr_ratio
    if cfg.lr_schedule == "cosine" and not total_steps:
        raise ValueError("trainer.lr_schedule = 'cosine' needs the run's total optimizer steps "
                         "(TrainerEngine(total_steps=...)), got none")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.lr_schedule == "constant" or total_steps <= warmup:  # a run shorter than its warmup
            return 1.0
        progress = min(1.0, (step - warmup) / (total_steps - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
