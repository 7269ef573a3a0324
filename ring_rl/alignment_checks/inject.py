"""Known rollout/trainer discrepancies that `align-check --inject NAME` plants on the rollout side.

Each op injection replaces one field of the rollout model's `ModelOps` (the trainer keeps
the defaults), so the harness can be shown to catch it and to name where it starts.
`expected_first` says where that must be: the layer index (None: after the decoder stack,
i.e. final norm and lm_head) and the op name (`trace.OP_ORDER`, `trace.HEAD_OPS`). The ops
live in `model/ops.py`; architecture.md says why each is a real source of mismatch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ring_rl.model import ops as model_ops
from ring_rl.model.ops import ModelOps


@dataclass(frozen=True)
class Injection:
    name: str
    description: str
    change_ops: Callable[[ModelOps], ModelOps] | None = None  # None: not an op change
    # Where the first divergence must be found: (which layer, op), the layer one of
    # "first_lightning", "first_moe", "first" or "head" (see expected_first).
    expect: tuple[str, str] | None = None
    # Engine-level: rollout logprobs reported from the top-k/top-p-processed distribution.
    processed_logprobs: bool = False


INJECTIONS: dict[str, Injection] = {inj.name: inj for inj in [
    Injection("decay_shift", "(a) lightning decay schedule shifted by one layer (vLLM's ℓ = layer_idx)",
              lambda o: o.with_(log_decay=model_ops.decay_vllm), expect=("first_lightning", "attn_core")),
    Injection("bf16_state", "(b) lightning recurrent state cached in bf16 between decode steps",
              lambda o: o.with_(state_dtype=torch.bfloat16,
                                lightning_attn_decode=model_ops.lightning_attn_decode_rounded_state),
              expect=("first_lightning", "attn_core")),
    Injection("bf16_router", "(c) MoE router logits computed in bf16 instead of fp32",
              lambda o: o.with_(router_logits=model_ops.router_logits_bf16),
              expect=("first_moe", "router")),
    Injection("group_norm_groups", "(d) output group norm with group_norm_size read as a group size",
              lambda o: o.with_(group_norm_gate=model_ops.group_norm_gate_size_as_count),
              expect=("first_lightning", "out_gate")),
    Injection("rope_full", "(e) RoPE over all head dims instead of the partial rotary slice",
              lambda o: o.with_(rotary=model_ops.rotary_full), expect=("first", "rotary")),
    Injection("bf16_lm_head", "(f) lm_head matmul in bf16 instead of fp32",
              lambda o: o.with_(lm_logits=model_ops.lm_logits_model_dtype), expect=("head", "lm_head")),
    Injection("processed_logprobs", "rollout reports logprobs of the top-k/top-p-processed "
              "distribution (vLLM's processed_logprobs mode); no op changes", processed_logprobs=True),
]}


def get_injection(name: str | None) -> Injection | None:
    if name is None or name == "none":
        return None
    if name not in INJECTIONS:
        raise ValueError(f"--inject {name!r}: unknown injection; choose one of {', '.join(INJECTIONS)}")
    return INJECTIONS[name]


def rollout_ops(injection: Injection | None, base: ModelOps = model_ops.DEFAULT_OPS) -> ModelOps:
    """The op bundle the rollout model is built with."""
    if injection is None or injection.change_ops is None:
        return base
    return injection.change_ops(base)


def expected_first(injection: Injection, config) -> tuple[int | None, str] | None:
    """(layer index or None for after the stack, op) where `injection` must first show."""
    if injection.expect is None:
        return None
    where, op = injection.expect
    layers = range(config.num_hidden_layers)
    layer = {"first": 0, "head": None,
             "first_lightning": next(i for i in layers if not config.is_softmax_layer(i)),
             "first_moe": next(i for i in layers if config.is_moe_layer(i))}[where]
    return layer, op
