"""Triton kernels for the backward of the routed SwiGLU experts (layout: triton_experts.py).

    G   = dy[tok] @ Wd_e                   (dL/dh without the routing weight w)
    dw  = sum_i G * h                      (routing-weight gradient: dy . o, o before rounding)
    dh  = w * G;  dg = dh * u * silu'(g);  du = dh * silu(g);  hw = w * h
    dxs[slot] = [dg, du] @ Wgu_e,  dx = sum_j dxs        (fixed order j = 0..k-1)
    dWd_e = dy[tok]^T @ hw,  dWgu_e = [dg, du]^T @ x[tok]  (per expert, rows in order)
h = silu(g) * u is recomputed from the saved gu and rounded as the forward rounded it.
The SwiGLU backward runs in the epilogue of the G GEMM (DOWN_BWD_FUSED) or, unfused, in a
row-wise kernel over G stored in x's dtype. No atomics: bitwise reproducible.

With triton_experts.BWD_GEMMS != "triton", some GEMMs run through torch._grouped_mm (CUTLASS
on sm90): per expert dWgu_e = dgu_e^T x_e and dWd_e = dy_e^T hw_e in the 2D x 2D form (offs
over the rows: A = dgu.t() column-major, B row-major -- the one layout whose empty groups
CUTLASS accepts; they come out as zeros on sm90), G and dx in the 2D x 3D form. These need x
and dy rows in expert order, which `gather_rows` copies at HBM speed (a copy written by the G
GEMM as it loads the rows cost more: the stores stall its pipelined loads, 0.54 -> 1.24 ms).
A deterministic split-K of the Triton dW kernel is not offered: its 49K output tiles already
fill the GPU, and fp32 partials would cost 3.2 GB of writes per split.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ring_rl.kernels.moe import triton_experts as fx
from ring_rl.kernels.moe.tile_fit import fit_stages
from ring_rl.kernels.moe.triton_experts import (
    CONFIGS,
    LAUNCHED,
    ExpertPlan,
    _mainloop,
    _prec,
    _tile,
    row_gemm,
    sorted_gemm,
)
from ring_rl.kernels.moe.triton_rows import combine, gather_rows, grouped_mm_ok


@triton.jit
def _down_bwd_kernel(dy_ptr, wd_ptr, gu_ptr, wts_ptr, dgu_ptr, hw_ptr, dwp_ptr, tok_ptr, slot_ptr,
                     tile_e_ptr, tile_row_ptr, offs_ptr, H, I, E, n_rows,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     EVEN_K: tl.constexpr, PREC: tl.constexpr):
    """G = dy[tok] @ Wd_e (= dL/dh without the routing weight w), then with h = silu(g)*u:
    dw partial = sum_cols G*h; dh = w*G; dg = dh*u*silu'(g), du = dh*silu(g); hw = w*h."""
    num_n = (I + BLOCK_N - 1) // BLOCK_N
    pid_m = tl.program_id(0) // num_n
    pid_n = tl.program_id(0) % num_n
    e, rows, rmask = _tile(tile_e_ptr, tile_row_ptr, offs_ptr, pid_m, E, BLOCK_M)
    if e >= E:
        return
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < I
    tok = tl.load(tok_ptr + rows, mask=rmask, other=0).to(tl.int64)
    # B element (k, n) = Wd_e[k, n] (k over H, n over I).
    acc = _mainloop(dy_ptr, tok, rmask, H, wd_ptr + e.to(tl.int64) * H * I, cols, cmask, I, 1,
                    H, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, PREC)
    dt = hw_ptr.dtype.element_ty
    r64 = rows.to(tl.int64)[:, None]
    omask = rmask[:, None] & cmask[None, :]
    g = tl.load(gu_ptr + r64 * (2 * I) + cols[None, :], mask=omask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + r64 * (2 * I) + I + cols[None, :], mask=omask, other=0.0).to(tl.float32)
    slot = tl.load(slot_ptr + rows, mask=rmask, other=0)
    w = tl.load(wts_ptr + slot, mask=rmask, other=0.0)[:, None]
    sig = 1.0 / (1.0 + tl.exp(-g))
    silu = g * sig
    h = (silu * u).to(dt).to(tl.float32)          # h exactly as the forward rounded it
    tl.store(dwp_ptr + pid_n.to(tl.int64) * n_rows + slot, tl.sum(acc * h, axis=1), mask=rmask)
    dh = acc * w
    dg = dh * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(dgu_ptr + r64 * (2 * I) + cols[None, :], dg.to(dt), mask=omask)
    tl.store(dgu_ptr + r64 * (2 * I) + I + cols[None, :], (dh * silu).to(dt), mask=omask)
    tl.store(hw_ptr + r64 * I + cols[None, :], (w * h).to(dt), mask=omask)


@triton.jit
def _wgrad_kernel(a_ptr, b_ptr, c_ptr, tok_ptr, offs_ptr, order_ptr, M, N, stride_a, stride_b,
                  GATHER_A: tl.constexpr, GATHER_B: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    """c[e] [M, N] = sum over expert e's rows r of A[r, :M]^T B[r, :N], rows in order.
    A (or B) row r is read at tok[r] when GATHER_A (GATHER_B), else at r. Programs take the
    experts busiest first (order_ptr), so the long loops of crowded experts start early."""
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    pid = tl.program_id(0)
    e = tl.load(order_ptr + pid // (num_m * num_n))
    pid_m = (pid // num_n) % num_m
    pid_n = pid % num_n
    lo = tl.load(offs_ptr + e)
    hi = tl.load(offs_ptr + e + 1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = rm < M
    nmask = rn < N
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(lo, hi, BLOCK_K):
        r = r0 + rk
        kmask = r < hi
        t = tl.load(tok_ptr + r, mask=kmask, other=0).to(tl.int64)
        ra = t if GATHER_A else r.to(tl.int64)
        rb = t if GATHER_B else r.to(tl.int64)
        a = tl.load(a_ptr + ra[None, :] * stride_a + rm[:, None],
                    mask=kmask[None, :] & mmask[:, None], other=0.0)
        b = tl.load(b_ptr + rb[:, None] * stride_b + rn[None, :],
                    mask=kmask[:, None] & nmask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
    c_ptrs = c_ptr + e.to(tl.int64) * M * N + rm[:, None].to(tl.int64) * N + rn[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


def wgrad(a, b, plan: ExpertPlan, gather_a: bool, out_dtype, cfg=None):
    """[E, M, N]: per expert, the sum over its rows of a[row]^T b[row] (gathered by token
    where asked). a: [*, M], b: [*, N]."""
    bm, bn, bk, warps, stages = cfg or CONFIGS["wgrad"]
    stages = fit_stages(bm, bn, bk, stages, a.dtype)
    m, n, e = a.shape[1], b.shape[1], plan.num_experts
    c = torch.empty(e, m, n, device=a.device, dtype=out_dtype)
    grid = (e * triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    LAUNCHED["wgrad"] = _wgrad_kernel[grid](
        a, b, c, plan.tokens, plan.offsets, plan.by_load, m, n, a.stride(0), b.stride(0),
        GATHER_A=gather_a, GATHER_B=not gather_a, BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_K=bk, PREC=_prec(a), num_warps=warps, num_stages=stages)
    return c


@triton.jit
def _swiglu_bwd_kernel(gd_ptr, gu_ptr, wts_ptr, slot_ptr, dgu_ptr, hw_ptr, dw_ptr, n_rows, I,
                       BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr):
    """Unfused SwiGLU backward: rows r (sorted order), all I columns at once, so the
    routing-weight gradient dw[slot] = sum_i G*h is complete in one program."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_I)
    rmask = rows < n_rows
    mask = rmask[:, None] & (cols < I)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    dt = hw_ptr.dtype.element_ty
    gd = tl.load(gd_ptr + r64 * I + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gu_ptr + r64 * (2 * I) + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + r64 * (2 * I) + I + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    slot = tl.load(slot_ptr + rows, mask=rmask, other=0)
    w = tl.load(wts_ptr + slot, mask=rmask, other=0.0)[:, None]
    sig = 1.0 / (1.0 + tl.exp(-g))
    silu = g * sig
    h = (silu * u).to(dt).to(tl.float32)
    tl.store(dw_ptr + slot, tl.sum(gd * h, axis=1), mask=rmask)
    dh = gd * w
    tl.store(dgu_ptr + r64 * (2 * I) + cols[None, :],
             (dh * u * sig * (1.0 + g * (1.0 - sig))).to(dt), mask=mask)
    tl.store(dgu_ptr + r64 * (2 * I) + I + cols[None, :], (dh * silu).to(dt), mask=mask)
    tl.store(hw_ptr + r64 * I + cols[None, :], (w * h).to(dt), mask=mask)


def swiglu_bwd(gd, gu, wts, plan: ExpertPlan):
    """(dgu [N, 2I], hw [N, I], dweights [T*k] fp32) from G [N, I] (the unfused path)."""
    n, inter = plan.num_rows, gu.shape[1] // 2
    dgu = torch.empty_like(gu)
    hw = torch.empty(n, inter, device=gu.device, dtype=gu.dtype)
    dwts = torch.empty(n, device=gu.device, dtype=torch.float32)
    br, _, _, warps, _ = CONFIGS["swiglu_bwd"]
    _swiglu_bwd_kernel[(triton.cdiv(n, br),)](
        gd, gu, wts, plan.slots, dgu, hw, dwts, n, inter, BLOCK_R=br,
        BLOCK_I=triton.next_power_of_2(inter), num_warps=warps)
    return dgu, hw, dwts


def down_bwd(dy, w_down, gu, wts, plan: ExpertPlan, fused=None, cfg=None):
    """(dgu [N, 2I], hw [N, I], dweights [T*k] fp32): the down projection's backward and
    the SwiGLU backward (see the module doc)."""
    fused = fx.DOWN_BWD_FUSED if fused is None else fused
    n, inter = plan.num_rows, gu.shape[1] // 2
    hid = dy.shape[1]
    if not fused:
        gd = row_gemm(dy, w_down, plan, transpose_w=False, cfg=cfg or CONFIGS["down_bwd"],
                      gather_a=True, scatter_c=False)
        return swiglu_bwd(gd, gu, wts, plan)
    dgu = torch.empty_like(gu)
    hw = torch.empty(n, inter, device=gu.device, dtype=gu.dtype)
    bm, bn, bk, warps, stages = cfg or CONFIGS["down_bwd"]
    stages = fit_stages(bm, bn, bk, stages, dy.dtype)
    nb = triton.cdiv(inter, bn)
    dwp = torch.empty(nb, n, device=gu.device, dtype=torch.float32)
    te, tr = plan.tiles(bm)
    LAUNCHED["down_bwd"] = _down_bwd_kernel[(te.numel() * nb,)](
        dy, w_down, gu, wts, dgu, hw, dwp, plan.tokens, plan.slots, te, tr, plan.offsets,
        hid, inter, plan.num_experts, n, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        EVEN_K=hid % bk == 0, PREC=_prec(dy), num_warps=warps, num_stages=stages)
    dwts = dwp[0]
    for i in range(1, nb):            # fixed order over the column blocks
        dwts = dwts + dwp[i]
    return dgu, hw, dwts


def grouped_wgrad(a, b, plan: ExpertPlan):
    """[E, M, N]: per expert a_e^T b_e over its rows (a [N, M], b [N, N'] in sorted order)."""
    return torch._grouped_mm(a.t(), b, offs=plan.ends)


def experts_bwd(dy, x, xs, wts, w_gate_up, w_down, gu, plan: ExpertPlan, needs):
    """(dx, dweights [T, k] fp32, dw_gate_up, dw_down); None where needs[i] is False.
    xs: x's rows in expert order if the forward kept them, else None. fx.BWD_GEMMS picks the
    GEMM engines, fx.TMA_GEMMS the kernels of the Triton ones (see triton_experts.py)."""
    mode = fx.BWD_GEMMS
    if mode not in ("triton", "gmm_dw", "gmm_dw_dx", "gmm_all"):
        raise ValueError(f"triton_experts.BWD_GEMMS={mode!r}: expected triton, gmm_dw, "
                         f"gmm_dw_dx or gmm_all")
    if mode != "triton" and not grouped_mm_ok(x, x.shape[1], gu.shape[1] // 2):
        mode = "triton"
    dys = None
    if mode != "triton":
        if needs[3] and xs is None:
            xs = gather_rows(x, plan)
        dys = gather_rows(dy, plan) if needs[4] or mode == "gmm_all" else None
    if mode == "gmm_all":
        gd = torch._grouped_mm(dys, w_down, offs=plan.ends)          # G [N, I], sorted
        dgu, hw, dwts = swiglu_bwd(gd, gu, wts, plan)
    elif dys is not None and not fx.DOWN_BWD_FUSED:     # G on the sorted rows: no gather
        gd = sorted_gemm(dys, w_down, plan, transpose_w=False, name="down_bwd", scatter_c=False)
        dgu, hw, dwts = swiglu_bwd(gd, gu, wts, plan)
    else:
        dgu, hw, dwts = down_bwd(dy, w_down, gu, wts, plan)
    dx = dwgu = dwd = None
    if needs[0]:
        if mode in ("gmm_dw_dx", "gmm_all"):
            dxs = torch._grouped_mm(dgu, w_gate_up, offs=plan.ends)   # sorted order
            dx = combine(dxs, None, plan.num_tokens, row_map=plan.inverse)
        else:
            dxs = sorted_gemm(dgu, w_gate_up, plan, transpose_w=False, name="dx")
            dx = combine(dxs, None, plan.num_tokens)
    dwts = dwts.view(plan.num_tokens, plan.top_k) if needs[2] else None
    if needs[3]:
        dwgu = (wgrad(dgu, x, plan, gather_a=False, out_dtype=w_gate_up.dtype)
                if mode == "triton" else grouped_wgrad(dgu, xs, plan))
    if needs[4]:
        dwd = (wgrad(dy, hw, plan, gather_a=True, out_dtype=w_down.dtype) if dys is None
               else grouped_wgrad(dys, hw, plan))
    return dx, dwts, dwgu, dwd
