"""ring-rl's one kernel library: each op has a plain-PyTorch reference and Triton kernels.

Both engines (the native/vLLM rollout and the DeepSpeed trainer) call these functions, so
they compute the same maths with the same code. Dispatch: see `dispatch.py`.
"""
from ring_rl.kernels.attention import paged_attention
from ring_rl.kernels.lightning_attn import (
    lightning_attn,
    lightning_attn_decode,
    lightning_attn_shared,
)
from ring_rl.kernels.matmul import linear
from ring_rl.kernels.moe import moe_experts, moe_route, router_logits
from ring_rl.kernels.rms_norm import group_rms_norm_gate, rms_norm

__all__ = [
    "lightning_attn",
    "lightning_attn_decode",
    "lightning_attn_shared",
    "rms_norm",
    "group_rms_norm_gate",
    "router_logits",
    "moe_route",
    "moe_experts",
    "linear",
    "paged_attention",
]
