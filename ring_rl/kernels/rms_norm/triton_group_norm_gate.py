"""Triton grouped RMSNorm + sigmoid gate (Ring-linear's lightning-attention output gate).

A row of F features is loaded as a [BLOCK_G, BLOCK_D] tile (group g, offset d -> column
g * D + d), so each program handles a [BLOCK_M, BLOCK_G, BLOCK_D] block and the per-group
statistics are plain reductions over the last axis. As in `triton_rms_norm`, tile shapes
depend on (num_groups, D) only (batch invariance) and the weight gradient is a sum of
per-program fp32 partials in a fixed order (no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ring_rl.kernels.rms_norm.triton_rms_norm import num_persistent_programs

# Chosen by `benchmarks/rms_norm.py --sweep group` (H100, [16384, 2048], 4 groups): the
# backward holds x, gate, dout and the weight-gradient accumulator, so it wants small tiles.
FWD_TILE = 8192
FWD_WARPS = 8
BWD_TILE = 2048
BWD_WARPS = 8


def group_config(num_groups: int, group: int, tile: int, warps: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_G, BLOCK_D, num_warps) for rows of num_groups groups of `group` features."""
    block_g = triton.next_power_of_2(num_groups)
    block_d = triton.next_power_of_2(group)
    block_f = block_g * block_d
    if block_f > 65536:
        raise ValueError(f"group_rms_norm_gate: padded row of {block_f} features exceeds 65536")
    warps = 16 if block_f >= 16384 else warps
    return max(1, tile // block_f), block_g, block_d, warps


@triton.jit
def _group_gate_fwd_kernel(
    X, GATE, W, O, RSTD,
    M, D, NUM_GROUPS, stride_x, stride_g, eps,
    BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    gi = tl.arange(0, BLOCK_G)
    di = tl.arange(0, BLOCK_D)
    cols = gi[:, None] * D + di[None, :]
    col_ok = (gi[:, None] < NUM_GROUPS) & (di[None, :] < D)
    row_ok = rows < M
    mask = row_ok[:, None, None] & col_ok[None, :, :]
    F = NUM_GROUPS * D
    x = tl.load(X + rows[:, None, None] * stride_x + cols[None, :, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=2) / D + eps)  # [BLOCK_M, BLOCK_G]
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    g = tl.load(GATE + rows[:, None, None] * stride_g + cols[None, :, :], mask=mask, other=0.0)
    out = x * rstd[:, :, None] * w[None, :, :] * tl.sigmoid(g.to(tl.float32))
    tl.store(O + rows[:, None, None] * F + cols[None, :, :], out.to(O.dtype.element_ty), mask=mask)
    rstd_mask = row_ok[:, None] & (gi[None, :] < NUM_GROUPS)
    tl.store(RSTD + rows[:, None] * NUM_GROUPS + gi[None, :], rstd, mask=rstd_mask)


@triton.jit
def _group_gate_bwd_kernel(
    DO, X, GATE, W, RSTD, DX, DGATE, DW_PARTIAL,
    M, D, NUM_GROUPS, stride_do, stride_x, stride_g,
    COMPUTE_DW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    gi = tl.arange(0, BLOCK_G)
    di = tl.arange(0, BLOCK_D)
    cols = gi[:, None] * D + di[None, :]
    col_ok = (gi[:, None] < NUM_GROUPS) & (di[None, :] < D)
    F = NUM_GROUPS * D
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_M, BLOCK_G, BLOCK_D], dtype=tl.float32)
    num_tiles = tl.cdiv(M, BLOCK_M)
    for tile in range(pid, num_tiles, num_programs):
        rows = (tile * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_ok = rows < M
        mask = row_ok[:, None, None] & col_ok[None, :, :]
        x = tl.load(X + rows[:, None, None] * stride_x + cols[None, :, :], mask=mask, other=0.0)
        g = tl.load(GATE + rows[:, None, None] * stride_g + cols[None, :, :], mask=mask,
                    other=0.0)
        do = tl.load(DO + rows[:, None, None] * stride_do + cols[None, :, :], mask=mask,
                     other=0.0)
        rstd_mask = row_ok[:, None] & (gi[None, :] < NUM_GROUPS)
        rstd = tl.load(RSTD + rows[:, None] * NUM_GROUPS + gi[None, :], mask=rstd_mask,
                       other=0.0)
        xhat = x.to(tl.float32) * rstd[:, :, None]
        sig = tl.sigmoid(g.to(tl.float32))
        do = do.to(tl.float32)
        normed = xhat * w[None, :, :]
        dgate = do * normed * sig * (1.0 - sig)
        tl.store(DGATE + rows[:, None, None] * F + cols[None, :, :],
                 dgate.to(DGATE.dtype.element_ty), mask=mask)
        dnormed = do * sig  # gradient of the weighted, normalised x
        if COMPUTE_DW:
            dw_acc += dnormed * xhat
        dxhat = dnormed * w[None, :, :]
        proj = tl.sum(dxhat * xhat, axis=2) / D  # [BLOCK_M, BLOCK_G]
        dx = (dxhat - xhat * proj[:, :, None]) * rstd[:, :, None]
        tl.store(DX + rows[:, None, None] * F + cols[None, :, :], dx.to(DX.dtype.element_ty),
                 mask=mask)
    if COMPUTE_DW:
        tl.store(DW_PARTIAL + pid * F + cols, tl.sum(dw_acc, axis=0), mask=col_ok)


def group_gate_fwd(x2: torch.Tensor, g2: torch.Tensor, weight: torch.Tensor,
                   num_groups: int, eps: float):
    """x2, g2 [M, F] -> out [M, F] in gate's dtype, rstd [M, num_groups] fp32."""
    m, f = x2.shape
    d = f // num_groups
    out = torch.empty((m, f), dtype=g2.dtype, device=x2.device)
    rstd = torch.empty((m, num_groups), dtype=torch.float32, device=x2.device)
    if m == 0:
        return out, rstd
    block_m, block_g, block_d, warps = group_config(num_groups, d, FWD_TILE, FWD_WARPS)
    _group_gate_fwd_kernel[(triton.cdiv(m, block_m),)](
        x2, g2, weight, out, rstd, m, d, num_groups, x2.stride(0), g2.stride(0), eps,
        BLOCK_M=block_m, BLOCK_G=block_g, BLOCK_D=block_d, num_warps=warps,
    )
    return out, rstd


def group_gate_bwd(do: torch.Tensor, x2: torch.Tensor, g2: torch.Tensor, weight: torch.Tensor,
                   rstd: torch.Tensor, num_groups: int, need_dw: bool):
    """Gradients (dx in x's dtype, dgate in gate's dtype, dweight or None)."""
    m, f = x2.shape
    d = f // num_groups
    dx = torch.empty((m, f), dtype=x2.dtype, device=x2.device)
    dgate = torch.empty((m, f), dtype=g2.dtype, device=x2.device)
    block_m, block_g, block_d, warps = group_config(num_groups, d, BWD_TILE, BWD_WARPS)
    programs = num_persistent_programs(x2.device, triton.cdiv(m, block_m))
    partial = torch.empty((programs, f) if need_dw else (1,), dtype=torch.float32,
                          device=x2.device)
    if m > 0:
        _group_gate_bwd_kernel[(programs,)](
            do, x2, g2, weight, rstd, dx, dgate, partial,
            m, d, num_groups, do.stride(0), x2.stride(0), g2.stride(0),
            COMPUTE_DW=need_dw, BLOCK_M=block_m, BLOCK_G=block_g, BLOCK_D=block_d,
            num_warps=warps,
        )
    dw = None
    if need_dw:
        dw = partial.sum(0).to(weight.dtype) if m > 0 else torch.zeros_like(weight)
    return dx, dgate, dw
