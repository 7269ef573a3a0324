"""Plain-PyTorch RMSNorm and grouped RMSNorm + sigmoid gate: the definitions.

Both engines (rollout and trainer) share these semantics; the Triton kernels in this
folder compute the same maths and are tested against these functions.
"""
from __future__ import annotations

import torch


def rms_norm_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
):
    """RMSNorm over the last dimension, optionally after a fused residual add.

    `h = x + residual` is taken in x's dtype (exactly as plain `x + residual` followed by a
    cast back to x's dtype), then `y = h.float() * rsqrt(mean(h.float()**2) + eps) *
    weight.float()`, computed entirely in fp32 -- the weight is multiplied in fp32 -- and
    cast once to x's dtype. Returns `y`, or `(y, h)` when a residual is given.
    """
    y, h, _ = rms_norm_parts(x, weight, eps, residual)
    return y if residual is None else (y, h)


def rms_norm_parts(x, weight, eps=1e-6, residual=None):
    """`rms_norm_ref`'s maths → (y, h, rstd [..., 1] fp32): the backward of the CPU path reuses rstd."""
    h = x if residual is None else (x + residual).to(x.dtype)
    xf = h.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    y = (xf * rstd * weight.float()).to(x.dtype)
    return y, h, rstd


def check_groups(num_features: int, num_groups: int) -> int:
    """Size of one group; refuses a feature count that the groups do not split evenly."""
    if num_groups <= 0 or num_features % num_groups != 0:
        raise ValueError(
            f"group_rms_norm_gate: num_groups={num_groups} must be a positive divisor of the "
            f"feature dimension {num_features}"
        )
    return num_features // num_groups


def group_rms_norm_gate_ref(
    x: torch.Tensor,
    gate: torch.Tensor,
    weight: torch.Tensor,
    num_groups: int,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Ring-linear's lightning-attention output gate: `GroupRMSNorm(x) * sigmoid(gate)`.

    The F features of x split into `num_groups` contiguous groups of F / num_groups; each
    group is RMS-normalised in fp32, multiplied by `weight` (fp32), then by
    `sigmoid(gate.float())`, and the product is cast once to gate's dtype.
    """
    num_features = x.shape[-1]
    group = check_groups(num_features, num_groups)
    if gate.shape != x.shape or weight.shape != (num_features,):
        raise ValueError(
            f"group_rms_norm_gate: x {tuple(x.shape)}, gate {tuple(gate.shape)} and weight "
            f"{tuple(weight.shape)} must be [..., F], [..., F] and [F]"
        )
    xg = x.float().reshape(*x.shape[:-1], num_groups, group)
    rstd = torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + eps)
    normed = (xg * rstd).reshape(x.shape) * weight.float()
    return (normed * torch.sigmoid(gate.float())).to(gate.dtype)
