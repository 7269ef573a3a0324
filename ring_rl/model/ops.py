"""The model's maths that engines must agree on, each as one named, swappable function.

`ModelOps` bundles them; every layer calls its op through the model's `ops`, so the
alignment harness can build a model with one op replaced (e.g. vLLM's decay schedule)
and check that the difference is caught and localised.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F

from ring_rl import kernels


# -- lightning-attention decay schedule ---------------------------------------------------
def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi slopes: 2^(-8(h+1)/H) for H a power of two; otherwise the slopes of the
    nearest lower power of two, then every other slope of the next one."""
    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]

    if math.log2(num_heads).is_integer():
        return power_of_two(num_heads)
    lower = 2 ** math.floor(math.log2(num_heads))
    return power_of_two(lower) + power_of_two(2 * lower)[0::2][: num_heads - lower]


def decay_hf(layer_idx: int, num_layers: int, num_heads: int) -> torch.Tensor:
    """log λ_h per head, the HF reference form: ℓ = layer_idx − 1, unclamped."""
    return _log_decay(layer_idx - 1, num_layers, num_heads)


def decay_vllm(layer_idx: int, num_layers: int, num_heads: int) -> torch.Tensor:
    """vLLM's / SGLang's form (ℓ = layer_idx): kept as an injectable mismatch."""
    return _log_decay(layer_idx, num_layers, num_heads)


def _log_decay(ell: int, num_layers: int, num_heads: int) -> torch.Tensor:
    factor = 1.0 - ell / max(num_layers - 1, 1) + 1e-5
    slopes = torch.tensor(alibi_slopes(num_heads), dtype=torch.float64)
    return (-slopes * factor).to(torch.float32)


# -- rotary embedding (neox style, partial) -----------------------------------------------
def rotary(x: torch.Tensor, positions: torch.Tensor, rotary_dim: int, theta: float) -> torch.Tensor:
    """Rotate the first `rotary_dim` features of x [N, heads, d] at `positions` [N], in fp32.

    Returns fp32. Neox layout: the two halves of the rotary slice form the pairs."""
    x = x.float()
    cos, sin = _cos_sin(positions, rotary_dim, theta)
    if torch.is_grad_enabled() and x.requires_grad:
        return _Rotary.apply(x, cos, sin, rotary_dim)
    return _rotate(x, cos, sin, rotary_dim)


def _rotate(x, cos, sin, rotary_dim: int) -> torch.Tensor:
    half = rotary_dim // 2
    x1, x2, rest = x[..., :half], x[..., half:rotary_dim], x[..., rotary_dim:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1)


class _Rotary(torch.autograd.Function):
    """The rotation forward; backward the inverse rotation of the gradient (one node instead
    of a dozen: slices, products and the cat, each with its own backward)."""

    @staticmethod
    def forward(ctx, x, cos, sin, rotary_dim):
        ctx.save_for_backward(cos, sin)
        ctx.rotary_dim = rotary_dim
        return _rotate(x, cos, sin, rotary_dim)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _rotate(dy, cos, -sin, ctx.rotary_dim), None, None, None


# (positions, its version, rotary_dim, theta, cos, sin): every layer of a CPU forward rotates at
# the same positions tensor, so its angles are computed once. Not on a GPU: a CUDA graph captured
# on a remembered result would replay without the kernels that compute it.
_last_cos_sin: tuple = ()


def _cos_sin(positions: torch.Tensor, rotary_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [N, 1, rotary_dim // 2] fp32 of the angles at `positions`."""
    global _last_cos_sin
    last = _last_cos_sin
    if last and last[0] is positions and last[1:4] == (positions._version, rotary_dim, theta):
        return last[4], last[5]
    remember = not positions.is_cuda
    half = rotary_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, half, device=positions.device, dtype=torch.float32) * 2.0 / rotary_dim))
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
    if remember:
        _last_cos_sin = (positions, positions._version, rotary_dim, theta, cos, sin)
    return cos, sin


def rotary_full(x: torch.Tensor, positions: torch.Tensor, rotary_dim: int, theta: float) -> torch.Tensor:
    """Injectable mismatch: RoPE over all dims, ignoring partial_rotary_factor."""
    return rotary(x, positions, x.shape[-1], theta)


# -- logits -----------------------------------------------------------------------------
def lm_logits_fp32(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """lm_head in fp32 (as SGLang keeps it): logits decide the sampled token's probability."""
    return F.linear(hidden.float(), weight.float())


def lm_logits_batch_invariant(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 logits from the fixed-tile GEMM (exact mode): bf16 x bf16 products are exact in
    fp32, so this is the fp32 lm_head up to summation order, and a token's logits do not
    depend on the batch."""
    if hidden.dtype != weight.dtype:
        hidden, weight = hidden.float(), weight.float()
    return kernels.linear(hidden, weight, out_dtype=torch.float32)


def lm_logits_model_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Injectable mismatch: lm_head in the model dtype (bf16), upcast afterwards."""
    return F.linear(hidden.to(torch.bfloat16), weight.to(torch.bfloat16)).float()


# -- injectable mismatches of the other ops (the defaults below never use them) ----------
def router_logits_bf16(x: torch.Tensor, gate_weight: torch.Tensor) -> torch.Tensor:
    """Injectable mismatch: the router matmul in bf16 (logits upcast afterwards), where
    Ring-linear's config asks for an fp32 router."""
    return F.linear(x.to(torch.bfloat16), gate_weight.to(torch.bfloat16)).float()


def group_norm_gate_size_as_count(x, gate, weight, num_groups: int, eps: float = 1e-6) -> torch.Tensor:
    """Injectable mismatch: `group_norm_size` read as the size of a group instead of the
    number of groups (F / group_norm_size groups of group_norm_size features)."""
    return kernels.group_rms_norm_gate(x, gate, weight, x.shape[-1] // num_groups, eps)


def lightning_attn_decode_rounded_state(q, k, v, log_decay, state, state_indices=None, scale=None):
    """The decode step for a recurrent state cached below fp32 (`state_dtype` bf16): the
    state is read up to fp32, stepped exactly as `lightning_attn_decode`, and stored back
    rounded to the cache's dtype. Only an injected mismatch needs it."""
    work = state.float()
    o = kernels.lightning_attn_decode(q, k, v, log_decay, work, state_indices=state_indices, scale=scale)
    state.copy_(work.to(state.dtype))
    return o


@dataclass(frozen=True)
class ModelOps:
    """The op set a model instance runs. Replace one field to inject a discrepancy."""

    log_decay: Callable[[int, int, int], torch.Tensor] = decay_hf
    rotary: Callable[..., torch.Tensor] = rotary
    rms_norm: Callable[..., torch.Tensor] = kernels.rms_norm
    group_norm_gate: Callable[..., torch.Tensor] = kernels.group_rms_norm_gate
    lightning_attn: Callable[..., tuple] = kernels.lightning_attn
    lightning_attn_decode: Callable[..., torch.Tensor] = kernels.lightning_attn_decode
    router_logits: Callable[..., torch.Tensor] = kernels.router_logits
    moe_route: Callable[..., tuple] = kernels.moe_route
    moe_experts: Callable[..., torch.Tensor] = kernels.moe_experts
    lm_logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = lm_logits_fp32
    linear: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.linear  # every dense projection
    # Softmax attention over the cache (q, k_cache, v_cache, block_table, seq_idx, positions,
    # scale), `kernels.paged_attention`'s signature; None: the engine's own (SDPA, vLLM's backend).
    paged_attention: Callable[..., torch.Tensor] | None = None
    state_dtype: torch.dtype = torch.float32  # recurrent state of the lightning layers

    def with_(self, **changes) -> "ModelOps":
        return replace(self, **changes)


DEFAULT_OPS = ModelOps()

# Exact mode on a GPU: every op's result for a token is independent of the batch around it.
# The default ops already are, except the cuBLAS GEMMs (size-dependent algorithms) and the
# attention backends (size-dependent KV splits); these replace them with fixed-tile Triton
# kernels. RMSNorm, the router, the experts and the lightning kernels use fixed tiles anyway.
BATCH_INVARIANT_OPS = DEFAULT_OPS.with_(linear=kernels.linear, lm_logits=lm_logits_batch_invariant,
                                        paged_attention=kernels.paged_attention)


def set_ops(model: torch.nn.Module, ops: ModelOps) -> ModelOps:
    """Give every module of `model` that runs ops this op set; returns the one it had."""
    before = getattr(model, "ops", DEFAULT_OPS)
    for module in model.modules():
        if isinstance(getattr(module, "ops", None), ModelOps):
            module.ops = ops
    return before


@contextmanager
def using_ops(model: torch.nn.Module, ops: ModelOps):
    before = set_ops(model, ops)
    try:
        yield model
    finally:
        set_ops(model, before)
