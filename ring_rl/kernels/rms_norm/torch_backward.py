"""RMSNorm and the gated group RMSNorm on CPU: the reference forward, an analytic backward.

Autograd through the reference records seven or eight nodes per norm (pow, mean, rsqrt,
three products, casts), each with its saved tensors; the tiny model runs 29 norms per
forward, and on a CPU the per-op overhead, not the arithmetic, is their cost. These
Functions run the reference's maths forward (the same ops, the same bits) and the
closed-form gradient backward, the formulas the Triton kernels use:
    x̂ = h * rstd,  g = dy * w:   dh = rstd * (g - x̂ * mean(g * x̂)),  dw = sum_rows dy * x̂
(per group for the gated norm, with dy = do * sigmoid(gate), and d gate = do * y * s * (1 - s)).
"""
from __future__ import annotations

import torch

from ring_rl.kernels.rms_norm.reference import group_rms_norm_gate_ref, rms_norm_parts


def _rstd(h: torch.Tensor, eps: float) -> torch.Tensor:
    """The reference's rstd, op for op (fp32, [..., 1])."""
    return torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + eps)


def _norm_grad(dyw: torch.Tensor, xhat: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    return rstd * (dyw - xhat * (dyw * xhat).mean(-1, keepdim=True))


class RMSNormTorchFunction(torch.autograd.Function):
    """rms_norm_ref(x, weight, eps, residual) → y, or (y, h) with a residual."""

    @staticmethod
    def forward(ctx, x, weight, eps, residual):
        y, h, rstd = rms_norm_parts(x, weight, eps, residual)
        ctx.save_for_backward(h, weight, rstd)
        ctx.residual_dtype = None if residual is None else residual.dtype
        ctx.set_materialize_grads(False)
        return y if residual is None else (y, h)

    @staticmethod
    def backward(ctx, dy, dh=None):
        h, weight, rstd = ctx.saved_tensors
        if dy is None and dh is None:
            return None, None, None, None
        xhat = h.float() * rstd
        dx, dw = None, None
        if dy is not None:
            dyf = dy.float()
            dx = _norm_grad(dyf * weight.float(), xhat, rstd)
            if ctx.needs_input_grad[1]:
                dw = (dyf * xhat).reshape(-1, h.shape[-1]).sum(0).to(weight.dtype)
        if dh is not None:
            dx = dh.float() if dx is None else dx + dh.float()
        dx = dx.to(h.dtype)
        dr = None if ctx.residual_dtype is None else dx.to(ctx.residual_dtype)
        return dx, dw, None, dr


class GroupRMSNormGateTorchFunction(torch.autograd.Function):
    """group_rms_norm_gate_ref(x, gate, weight, num_groups, eps)."""

    @staticmethod
    def forward(ctx, x, gate, weight, num_groups, eps):
        ctx.save_for_backward(x, gate, weight)
        ctx.num_groups, ctx.eps = num_groups, eps
        return group_rms_norm_gate_ref(x, gate, weight, num_groups, eps)

    @staticmethod
    def backward(ctx, do):
        x, gate, weight = ctx.saved_tensors
        f, groups = x.shape[-1], ctx.num_groups
        xg = x.float().reshape(*x.shape[:-1], groups, f // groups)
        rstd = _rstd(xg, ctx.eps)
        xhat = (xg * rstd).reshape(x.shape)
        s = torch.sigmoid(gate.float())
        dof = do.float()
        normed = xhat * weight.float()
        dgate = dof * normed * s * (1 - s)
        dn = dof * s                                     # d(normalised * weight)
        dxg = _norm_grad((dn * weight.float()).reshape(xg.shape), xhat.reshape(xg.shape), rstd)
        dw = (dn * xhat).reshape(-1, f).sum(0).to(weight.dtype) if ctx.needs_input_grad[2] else None
        return dxg.reshape(x.shape).to(x.dtype), dgate.to(gate.dtype), dw, None, None
