"""Feed-forward blocks: the dense SwiGLU MLP and the sparse MoE (sigmoid router with expert
bias for selection only, group-limited top-k, shared expert)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ring_rl.model.attention import KeepFP32Buffers
from ring_rl.model.config import RingLinearConfig
from ring_rl.model.ops import ModelOps


class DenseMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, ops: ModelOps):
        super().__init__()
        self.ops = ops
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        linear = self.ops.linear
        return linear(F.silu(linear(x, self.gate_proj.weight)) * linear(x, self.up_proj.weight),
                      self.down_proj.weight)


class MoEGate(KeepFP32Buffers):
    """`mlp.gate.weight` [E, hidden] (in the model dtype; the router upcasts and runs in
    fp32) and `mlp.gate.expert_bias` [E] (an fp32 buffer: set by pre-training's load
    balancing, never trained here)."""

    _fp32_buffers = ("expert_bias",)

    def __init__(self, hidden: int, num_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))
        self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))


class StackedExperts(nn.Module):
    """All routed experts in two stacked tensors, for grouped GEMMs.

    gate_up_proj [E, 2I, hidden]: rows :I are expert e's gate_proj, rows I: its up_proj.
    down_proj [E, hidden, I]. The checkpoint's per-expert names map here in checkpoint.py."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))


class MoE(nn.Module):
    def __init__(self, config: RingLinearConfig, ops: ModelOps):
        super().__init__()
        self.ops = ops
        self.top_k = config.num_experts_per_tok
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.scaling = config.routed_scaling_factor
        self.norm_topk_prob = config.norm_topk_prob
        self.use_bias = config.moe_router_enable_expert_bias
        self.gate = MoEGate(config.hidden_size, config.num_experts)
        self.experts = StackedExperts(config.hidden_size, config.moe_intermediate_size, config.num_experts)
        self.shared_experts = None
        if config.num_shared_experts:
            width = config.moe_shared_expert_intermediate_size * config.num_shared_experts
            self.shared_experts = DenseMLP(config.hidden_size, width, ops)

    def forward(self, x: torch.Tensor, replay_ids: torch.Tensor | None = None):
        """Returns (output, chosen expert ids [N, top_k])."""
        logits = self.ops.router_logits(x, self.gate.weight)
        bias = self.gate.expert_bias if self.use_bias else torch.zeros_like(self.gate.expert_bias)
        weights, ids = self.ops.moe_route(logits, bias, self.top_k, self.n_group, self.topk_group,
                                          self.scaling, self.norm_topk_prob, replay_ids=replay_ids)
        out = self.ops.moe_experts(x, ids, weights, self.experts.gate_up_proj, self.experts.down_proj)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out, ids
