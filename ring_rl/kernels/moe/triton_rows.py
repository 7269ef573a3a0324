"""Rows between token order and expert order, around the expert GEMMs of triton_experts.py.

- gather_rows: the token rows of x (or dy) copied into expert order, for the GEMMs that need
  them contiguous (TMA, torch._grouped_mm).
- combine: the experts' output rows back to tokens, each token's k rows summed (weighted in
  the forward) in the fixed order j = 0..k-1 -- no atomics, so bitwise reproducible.
- swiglu_fwd: h = silu(g) * u row-wise, for the grouped_mm forward (the Triton gate-up fuses it).
- grouped_mm_ok: whether torch._grouped_mm can take the sorted rows.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# (rows or tokens per program, columns per program, -, num_warps, -), in triton_experts.CONFIGS'
# layout. Tests may shrink them.
CONFIGS = {
    "combine": (16, 256, 0, 4, 1),       # (tokens, hidden) tile of the per-token sum
    "gather_rows": (8, 1024, 0, 4, 1),   # (rows, columns) tile of the sorted-row copy
    "swiglu_fwd": (8, 0, 0, 8, 1),       # rows per program of h = silu(g) * u (FWD_GEMMS gmm)
}


@triton.jit
def _swiglu_fwd_kernel(gu_ptr, h_ptr, n_rows, I, BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr):
    """h = silu(g) * u row-wise from the stored gu (FWD_GEMMS="gmm": gu is already rounded
    to its dtype here, where the Triton gate-up uses its fp32 accumulators)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_I)
    mask = (rows < n_rows)[:, None] & (cols < I)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    g = tl.load(gu_ptr + r64 * (2 * I) + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + r64 * (2 * I) + I + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    silu = g / (1.0 + tl.exp(-g))
    tl.store(h_ptr + r64 * I + cols[None, :], (silu * u).to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gather_rows_kernel(src_ptr, idx_ptr, dst_ptr, n_rows, W, BLOCK_R: tl.constexpr,
                        BLOCK_W: tl.constexpr):
    """dst[r] = src[idx[r]] (rows of width W, contiguous)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < n_rows
    src = tl.load(idx_ptr + r, mask=rmask, other=0).to(tl.int64)
    r64 = r.to(tl.int64)
    for c0 in range(0, W, BLOCK_W):
        c = c0 + tl.arange(0, BLOCK_W)
        m = rmask[:, None] & (c < W)[None, :]
        v = tl.load(src_ptr + src[:, None] * W + c[None, :], mask=m)
        tl.store(dst_ptr + r64[:, None] * W + c[None, :], v, mask=m)


@triton.jit
def _combine_kernel(o_ptr, w_ptr, map_ptr, y_ptr, T, H, K: tl.constexpr, HAS_W: tl.constexpr,
                    HAS_MAP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """y[t] = sum_j w[t, j] * o[t*K + j] (or the plain sum), fp32, j = 0..K-1 in order.
    HAS_MAP: o is in sorted order, slot t*K + j is its row map[t*K + j]."""
    rt = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rh = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    tmask = rt < T
    mask = tmask[:, None] & (rh < H)[None, :]
    rt64 = rt.to(tl.int64)
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for j in tl.static_range(K):
        if HAS_MAP:
            r = tl.load(map_ptr + rt64 * K + j, mask=tmask, other=0).to(tl.int64)
        else:
            r = rt64 * K + j
        o = tl.load(o_ptr + r[:, None] * H + rh[None, :], mask=mask, other=0.0)
        if HAS_W:
            w = tl.load(w_ptr + rt64 * K + j, mask=tmask, other=0.0)
            acc += w[:, None] * o.to(tl.float32)
        else:
            acc += o.to(tl.float32)
    tl.store(y_ptr + rt64[:, None] * H + rh[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------ launchers
def combine(o, wts, num_tokens: int, cfg=None, row_map=None):
    """[T, H]: per-token (weighted) sum of the slot-ordered rows o [T*k, H] (or, with
    row_map [T*k] int32, of the rows o[row_map[slot]])."""
    bt, bh, _, warps, _ = cfg or CONFIGS["combine"]
    k = o.shape[0] // max(num_tokens, 1)
    hid = o.shape[1]
    y = torch.empty(num_tokens, hid, device=o.device, dtype=o.dtype)
    grid = (triton.cdiv(num_tokens, bt), triton.cdiv(hid, bh))
    _combine_kernel[grid](o, o if wts is None else wts, o if row_map is None else row_map, y,
                          num_tokens, hid, K=k, HAS_W=wts is not None,
                          HAS_MAP=row_map is not None, BLOCK_T=bt, BLOCK_H=bh,
                          num_warps=warps)
    return y


def gather_rows(src: torch.Tensor, plan) -> torch.Tensor:
    """src[tok] [N, W]: the token rows of src [T, W] in expert (sorted-row) order, for the
    `triton_experts.ExpertPlan` plan."""
    src = src.contiguous()
    out = torch.empty(plan.num_rows, src.shape[1], device=src.device, dtype=src.dtype)
    br, bw, _, warps, _ = CONFIGS["gather_rows"]
    _gather_rows_kernel[(triton.cdiv(plan.num_rows, br),)](
        src, plan.tokens, out, plan.num_rows, src.shape[1], BLOCK_R=br,
        BLOCK_W=min(bw, triton.next_power_of_2(src.shape[1])), num_warps=warps)
    return out


def swiglu_fwd(gu: torch.Tensor) -> torch.Tensor:
    """h [N, I] = silu(g) * u from gu [N, 2I] (rows of any order)."""
    n, inter = gu.shape[0], gu.shape[1] // 2
    h = torch.empty(n, inter, device=gu.device, dtype=gu.dtype)
    br, _, _, warps, _ = CONFIGS["swiglu_fwd"]
    _swiglu_fwd_kernel[(triton.cdiv(n, br),)](gu, h, n, inter, BLOCK_R=br,
                                              BLOCK_I=triton.next_power_of_2(inter),
                                              num_warps=warps)
    return h


def grouped_mm_ok(x: torch.Tensor, *widths: int) -> bool:
    """Whether torch._grouped_mm can take these operands: CUTLASS needs bf16 on sm90 (on
    sm100 empty groups are not zeroed: pytorch issue 172439; elsewhere torch runs a slow
    per-group loop with a host sync) and 16-byte rows. CPU: torch's loop (tests)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.is_cuda and (x.dtype != torch.bfloat16
                      or torch.cuda.get_device_capability(x.device)[0] != 9):
        return False
    align = 16 // x.element_size()
    return all(w % align == 0 for w in widths)
