"""Triton RMSNorm forward and backward, with an optional fused residual add.

Layout: rows of length N (x viewed as [M, N], last dim contiguous). Each program of the
forward normalises a tile of BLOCK_M rows x BLOCK_N columns; the backward runs a fixed
number of persistent programs that walk row tiles and each write one fp32 partial of the
weight gradient, summed afterwards in a fixed order (no atomics, so bitwise reproducible).

Batch invariance: the tile shape and warp count depend on N only, never on M, so a row is
reduced by the same instruction sequence whether it sits alone or among a million rows.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# Tile sizes in elements: big enough for several 16-byte loads in flight per thread,
# small enough to keep the backward's x, dy and weight-gradient accumulator in registers.
# Module constants (not autotuned) so the reduction order is fixed: see batch invariance.
# Chosen by the sweep in benchmarks/rms_norm.py (H100, N = 2048 and 4096); small N (the
# per-head q/k norms) gets the same tile area, i.e. many rows per program.
FWD_TILE = 8192
FWD_WARPS = 8
BWD_TILE = 8192
BWD_WARPS = 8
PROGRAMS_PER_SM = 2


def fwd_config(n: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the forward; a function of N alone (batch invariance)."""
    block_n = triton.next_power_of_2(n)
    if block_n > 65536:
        raise ValueError(f"rms_norm: row length {n} exceeds the kernel's limit of 65536")
    return max(1, FWD_TILE // block_n), block_n, 16 if block_n >= 16384 else FWD_WARPS


def bwd_config(n: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the backward; a function of N alone."""
    block_n = triton.next_power_of_2(n)
    return max(1, BWD_TILE // block_n), block_n, 16 if block_n >= 16384 else BWD_WARPS


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_persistent_programs(device: torch.device, num_tiles: int) -> int:
    """Programs of the backward: a few per SM (4 under the CPU interpreter)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return max(1, min(num_tiles, PROGRAMS_PER_SM * _sm_count(index)))
    return max(1, min(num_tiles, 4))


@triton.jit
def _rms_norm_fwd_kernel(
    X, R, W, Y, H, RSTD,
    M, N, stride_x, stride_r, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
        # h = x + r rounded to x's dtype, exactly like eager `x + r` in PyTorch.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(H.dtype.element_ty)
        tl.store(H + rows[:, None] * N + cols[None, :], x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=1) / N + eps)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = xf * rstd[:, None] * w[None, :]
    tl.store(Y + rows[:, None] * N + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, DH, X, W, RSTD, DX, DW_PARTIAL,
    M, N, stride_x, stride_dy, stride_dh,
    HAS_DH: tl.constexpr, COMPUTE_DW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    num_tiles = tl.cdiv(M, BLOCK_M)
    for tile in range(pid, num_tiles, num_programs):
        rows = (tile * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0)
        dy = dy.to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        xhat = x * rstd[:, None]
        if COMPUTE_DW:
            dw_acc += dy * xhat
        dxhat = dy * w[None, :]
        # d/dx of x * rstd(x): rstd * (dxhat - xhat * mean(dxhat * xhat)).
        proj = tl.sum(dxhat * xhat, axis=1) / N
        dx = (dxhat - xhat * proj[:, None]) * rstd[:, None]
        if HAS_DH:
            dh = tl.load(DH + rows[:, None] * stride_dh + cols[None, :], mask=mask, other=0.0)
            dx += dh.to(tl.float32)
        tl.store(DX + rows[:, None] * N + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    if COMPUTE_DW:
        tl.store(DW_PARTIAL + pid * N + cols, tl.sum(dw_acc, axis=0), mask=col_ok)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., N] -> [M, N] with a contiguous last dim (a view when possible)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def rms_norm_fwd(x2: torch.Tensor, weight: torch.Tensor, eps: float,
                 r2: torch.Tensor | None = None):
    """x2 [M, N] (and residual r2 [M, N]) -> y [M, N], h [M, N] (x2 without residual), rstd [M]."""
    m, n = x2.shape
    y = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    h = x2 if r2 is None else torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x2.device)
    if m == 0:
        return y, h, rstd
    block_m, block_n, warps = fwd_config(n)
    _rms_norm_fwd_kernel[(triton.cdiv(m, block_m),)](
        x2, x2 if r2 is None else r2, weight, y, h, rstd,
        m, n, x2.stride(0), x2.stride(0) if r2 is None else r2.stride(0), eps,
        HAS_RESIDUAL=r2 is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )
    return y, h, rstd


def rms_norm_bwd(dy: torch.Tensor, dh: torch.Tensor | None, h: torch.Tensor,
                 weight: torch.Tensor, rstd: torch.Tensor, need_dw: bool):
    """Gradients of y = norm(h) (+ dh, the gradient reaching h directly): dh_total, dweight."""
    m, n = h.shape
    dx = torch.empty((m, n), dtype=h.dtype, device=h.device)
    block_m, block_n, warps = bwd_config(n)
    programs = num_persistent_programs(h.device, triton.cdiv(m, block_m))
    partial = torch.empty((programs, n) if need_dw else (1,), dtype=torch.float32, device=h.device)
    if m > 0:
        _rms_norm_bwd_kernel[(programs,)](
            dy, dy if dh is None else dh, h, weight, rstd, dx, partial,
            m, n, h.stride(0), dy.stride(0), dy.stride(0) if dh is None else dh.stride(0),
            HAS_DH=dh is not None, COMPUTE_DW=need_dw,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
        )
    dw = None
    if need_dw:
        # Fixed-order reduction of the per-program partials: deterministic run to run.
        dw = partial.sum(0).to(weight.dtype) if m > 0 else torch.zeros_like(weight)
    return dx, dw
