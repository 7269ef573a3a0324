"""RMSNorm ops: `rms_norm` (optionally with a fused residual add) and `group_rms_norm_gate`.

Each public function dispatches (see `ring_rl.kernels.dispatch`) between the plain-PyTorch
definition in `reference.py` and Triton kernels wrapped in the autograd Functions below; on
CPU with gradients the reference forward runs with a closed-form backward
(`torch_backward.py`: fewer autograd nodes).
Both compute in fp32 and cast once at the end; the Triton path's outputs and gradients are
bitwise reproducible and a row's result does not depend on the other rows of the batch.
"""
from __future__ import annotations

import torch

from ring_rl.kernels.dispatch import kernel_mode, use_triton
from ring_rl.kernels.rms_norm.reference import (
    check_groups,
    group_rms_norm_gate_ref,
    rms_norm_ref,
)
from ring_rl.kernels.rms_norm.torch_backward import (
    GroupRMSNormGateTorchFunction,
    RMSNormTorchFunction,
)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., N] -> [M, N] with a contiguous last dim (a view when possible)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _grad_rows(g: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return None if g is None else _rows(g).reshape(-1, like.shape[-1])


class RMSNormFunction(torch.autograd.Function):
    """y = rms_norm(x) * weight, Triton forward and backward."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        from ring_rl.kernels.rms_norm import triton_rms_norm as k

        x2 = _rows(x)
        y, _, rstd = k.rms_norm_fwd(x2, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        from ring_rl.kernels.rms_norm import triton_rms_norm as k

        x2, weight, rstd = ctx.saved_tensors
        dx, dw = k.rms_norm_bwd(_rows(dy), None, x2, weight, rstd, ctx.needs_input_grad[1])
        return dx.view(dy.shape), dw, None


class FusedAddRMSNormFunction(torch.autograd.Function):
    """h = x + residual (in x's dtype); y = rms_norm(h) * weight. Returns (y, h)."""

    @staticmethod
    def forward(ctx, x, residual, weight, eps):
        from ring_rl.kernels.rms_norm import triton_rms_norm as k

        x2 = _rows(x)
        y, h, rstd = k.rms_norm_fwd(x2, weight, eps, _rows(residual))
        ctx.save_for_backward(h, weight, rstd)
        ctx.residual_dtype = residual.dtype
        # An unused output gets None, not a tensor of zeros that the kernel would read.
        ctx.set_materialize_grads(False)
        return y.view(x.shape), h.view(x.shape)

    @staticmethod
    def backward(ctx, dy, dh):
        from ring_rl.kernels.rms_norm import triton_rms_norm as k

        h, weight, rstd = ctx.saved_tensors
        if dy is None and dh is None:
            return None, None, None, None
        shape = (dy if dy is not None else dh).shape
        dy2 = _rows(dy) if dy is not None else torch.zeros_like(h)
        dx, dw = k.rms_norm_bwd(dy2, _grad_rows(dh, h), h, weight, rstd, ctx.needs_input_grad[2])
        dx = dx.view(shape)
        # d(x + r)/dx = d(x + r)/dr = 1: both inputs get dh_total (as autograd's add does).
        dr = dx if ctx.residual_dtype == dx.dtype else dx.to(ctx.residual_dtype)
        return dx, dr, dw, None


class GroupRMSNormGateFunction(torch.autograd.Function):
    """out = group_rms_norm(x) * weight * sigmoid(gate), Triton forward and backward."""

    @staticmethod
    def forward(ctx, x, gate, weight, num_groups, eps):
        from ring_rl.kernels.rms_norm import triton_group_norm_gate as k

        x2, g2 = _rows(x), _rows(gate)
        out, rstd = k.group_gate_fwd(x2, g2, weight, num_groups, eps)
        ctx.save_for_backward(x2, g2, weight, rstd)
        ctx.num_groups = num_groups
        return out.view(gate.shape)

    @staticmethod
    def backward(ctx, do):
        from ring_rl.kernels.rms_norm import triton_group_norm_gate as k

        x2, g2, weight, rstd = ctx.saved_tensors
        dx, dgate, dw = k.group_gate_bwd(
            _rows(do), x2, g2, weight, rstd, ctx.num_groups, ctx.needs_input_grad[2]
        )
        return dx.view(do.shape), dgate.view(do.shape), dw, None, None


def _analytic_backward(*tensors: torch.Tensor | None) -> bool:
    """The reference path in training (auto mode): forward as defined, backward in closed form."""
    return (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
            and kernel_mode() == "auto")


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
):
    """RMSNorm over the last dim of x [..., N] with weight [N]; optional fused residual add.

    Maths (shared by both engines): `h = x + residual` in x's dtype (when given);
    `y = h.float() * rsqrt(mean(h.float()**2, -1) + eps) * weight.float()` all in fp32 --
    the weight is multiplied in fp32, before the single cast of y to x's dtype.
    Returns `y`, or `(y, h)` when `residual` is given (h is the new residual stream).
    """
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} must be [{x.shape[-1]}] "
                         f"to match x {tuple(x.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"rms_norm: residual {tuple(residual.shape)} must match x "
                         f"{tuple(x.shape)}")
    if not use_triton(x, residual, weight):
        if _analytic_backward(x, residual, weight):
            return RMSNormTorchFunction.apply(x, weight, eps, residual)
        return rms_norm_ref(x, weight, eps, residual)
    weight = weight.contiguous()
    if residual is None:
        return RMSNormFunction.apply(x, weight, eps)
    return FusedAddRMSNormFunction.apply(x, residual, weight, eps)


def group_rms_norm_gate(
    x: torch.Tensor,
    gate: torch.Tensor,
    weight: torch.Tensor,
    num_groups: int,
    eps: float = 1e-6,
) -> torch.Tensor:
    """`GroupRMSNorm(x) * weight * sigmoid(gate)`, cast to gate's dtype (see reference.py).

    x [..., F] (any float dtype, often fp32), gate [..., F] (pre-sigmoid), weight [F]; the F
    features form `num_groups` contiguous groups, each RMS-normalised in fp32.
    """
    f = x.shape[-1]
    check_groups(f, num_groups)
    if gate.shape != x.shape or weight.shape != (f,):
        raise ValueError(f"group_rms_norm_gate: x {tuple(x.shape)}, gate {tuple(gate.shape)} "
                         f"and weight {tuple(weight.shape)} must be [..., F], [..., F], [F]")
    if not use_triton(x, gate, weight):
        if _analytic_backward(x, gate, weight):
            return GroupRMSNormGateTorchFunction.apply(x, gate, weight, num_groups, eps)
        return group_rms_norm_gate_ref(x, gate, weight, num_groups, eps)
    return GroupRMSNormGateFunction.apply(x, gate, weight.contiguous(), num_groups, eps)


__all__ = ["rms_norm", "group_rms_norm_gate", "rms_norm_ref", "group_rms_norm_gate_ref",
           "RMSNormFunction", "FusedAddRMSNormFunction", "GroupRMSNormGateFunction"]
