"""Triton grouped GEMMs for the routed SwiGLU experts (forward and backward).

Layout. The T*k slots (slot = t*k + j) are sorted stably by expert (`make_plan`); "rows" are
positions in that order, expert e owning rows offsets[e]:offsets[e+1]. A row-GEMM program
owns one tile of BLOCK_M rows of a single expert (a per-tile schedule: tile -> expert, first
row; no padding copies) and one BLOCK_N column block. Rows read the token activations through
the token index (gather in the load) and write slot-ordered outputs through the slot index
(scatter in the store), so these kernels need no permuted copy of x or of the outputs. Where
the A rows are in expert order anyway (h, dgu, copied x / dy rows) the GEMMs named in
TMA_GEMMS load their tiles through TMA instead (triton_tma.py).

Forward:  gu, h = gate_up(x[tok]) (+ SwiGLU epilogue)  -> o[slot] = h @ Wd^T -> y = combine(o, w)
Backward (triton_experts_bwd.py): G = dy[tok] @ Wd (on the copied dy rows where there are
          some), then the SwiGLU backward (dgu, hw = w*h
          and the routing-weight gradient sum(G*h)); dxs[slot] = dgu @ Wgu, dx = combine(dxs);
          dWd_e = dy[tok]^T @ hw, dWgu_e = dgu^T @ x[tok] (per expert).
Saved for the backward: x, the weights and gu [T*k, 2I] (h is recomputed from gu), and with
FWD_ROWS="sorted" x's rows in expert order.
Determinism: every output element is written by exactly one program, weight gradients loop
over the expert's rows in order (no split-K), per-token sums run j = 0..k-1: no atomics.
The backward's GEMMs can also run through torch._grouped_mm (BWD_GEMMS, see
triton_experts_bwd.py), on x and dy rows copied in expert order; by default the weight
gradients do. By default the forward runs these kernels (batch invariance: fixed tiles);
FWD_GEMMS="gmm" runs it through torch._grouped_mm (see there).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ring_rl.kernels.moe import triton_plan
from ring_rl.kernels.moe.tile_fit import fit_stages
from ring_rl.kernels.moe.triton_plan import ExpertPlan
from ring_rl.kernels.moe.triton_rows import (
    combine,
    gather_rows,
    grouped_mm_ok,
    swiglu_fwd,
)

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per kernel; chosen on an H100 with
# `benchmarks/moe.py --sweep` (see benchmarks/results/moe.md). Tests may shrink them.
CONFIGS = {
    "gate_up": (128, 128, 64, 8, 3),     # x[tok] @ Wgu^T, two accumulators (gate, up)
    "down": (128, 256, 64, 8, 3),        # h @ Wd^T -> o[slot]
    "down_bwd": (128, 256, 64, 8, 4),    # dy[tok] @ Wd (+ SwiGLU backward when fused)
    "swiglu_bwd": (8, 0, 0, 8, 1),       # rows per program of the unfused SwiGLU backward
    "dx": (128, 256, 64, 8, 4),          # dgu @ Wgu -> dxs[slot]
    "wgrad": (128, 128, 64, 8, 3),       # per-expert A^T @ B over the expert's rows
    # TMA kernels (triton_tma.py) on rows already in expert order
    "gate_up_tma": (128, 128, 64, 8, 4),
    "down_tma": (128, 256, 64, 8, 4),       # persistent (PERSISTENT_GEMMS), H200
    "down_bwd_tma": (128, 256, 64, 8, 3),   # G = dy rows (sorted) @ Wd; persistent
    "dx_tma": (128, 256, 64, 8, 4),         # persistent
}
LAUNCHED = {}   # the last compiled kernel of each launcher (register / spill counts)

# Backward of the down projection: True = the SwiGLU backward in the GEMM's epilogue;
# False = the GEMM stores dL/dh (x's dtype) and a row-wise kernel does the SwiGLU backward.
# Unfused is faster on an H100 (0.86 vs 1.28 ms at Ring-mini shapes: the fused epilogue
# spills registers at every tile size tried; benchmarks/results/moe.md).
DOWN_BWD_FUSED = False

# Which backward GEMMs run through torch._grouped_mm (CUTLASS grouped GEMM on sm90, bf16;
# elsewhere these paths fall back to "triton"; on CPU torch's per-group loop, for tests):
#   "triton"     all Triton (rows gathered in the loads, no sorted copies);
#   "gmm_dw"     both weight gradients (dW_e = A_e^T B_e with offs over the rows), on the
#                x and dy rows copied in expert order by a gather kernel (gather_rows);
#   "gmm_dw_dx"  as gmm_dw, and dx too (sorted output, combined through the inverse perm.);
#   "gmm_all"    as gmm_dw_dx, and G = dy_sorted Wd too.
# Deterministic either way: CUTLASS's grouped kernel gives every output tile to one CTA
# with the whole K loop (no split-K, no atomics). benchmarks/results/moe.md has the timings:
# gmm_dw is the fastest block on an H100 (the weight gradients 1.89 ms vs 2.63 in Triton,
# for 0.66 ms of row copies).
BWD_GEMMS = "gmm_dw"
# Rows of x in the forward: "gather" (the gate-up GEMM reads x[tok] in its loads; the
# backward copies them in expert order where its grouped_mm GEMMs need them) or "sorted"
# (gather_rows copies them once in the forward and they are saved for the backward: no copy
# there, and the gate-up can run on contiguous rows (TMA, grouped_mm) -- at the price of
# T*k*H elements of saved activations, k times x: 512 MiB per layer at 16K tokens, Ring-mini
# shapes. On an H200 it made the block fwd+bwd 0-4% faster over three runs (6.672 vs 6.842
# ms, benchmarks/results/moe.md): the default stays the lean one.
FWD_ROWS = "gather"
# The forward GEMMs: "triton" (ours) or "gmm" (torch._grouped_mm on the sorted x rows, then
# a row-wise SwiGLU on the bf16-rounded gate/up outputs, and the down projection; needs
# sorted rows, so it implies FWD_ROWS="sorted"). CUTLASS picks its tile from the average
# rows per expert, so batch invariance of this path rests on its per-element sums not
# depending on the tile (checked by the GPU tests, not guaranteed).
FWD_GEMMS = "triton"
# The row GEMMs that run through TMA (triton_tma.py, Hopper and later) when their A rows
# are already in expert order: "gate_up" (with FWD_ROWS="sorted"), "down" (h), "dx" (dgu),
# "down_bwd" (G, on the dy rows copied for the dW GEMMs). The others -- and these where TMA
# cannot take the shapes -- run the pointer kernels here, on the sorted rows where there
# are some. At Ring-mini shapes on an H200 (benchmarks/results/moe.md): gate-up 1.13 vs
# 1.28 ms, down 0.67 vs 0.73, dx 1.13 vs 1.18 one program per tile; G 0.47 in the pointer
# kernel vs 0.53 through TMA, but 0.45 as a persistent TMA kernel (PERSISTENT_GEMMS).
TMA_GEMMS = ("gate_up", "down", "dx", "down_bwd")
# The TMA row GEMMs that run as persistent kernels (one program per SM looping over the
# tiles in use, instead of one program per tile; triton_tma.py): the loop lets the pipeliner
# load a tile's first boxes while the last tile's results are stored, which pays where the
# reduction is short. The same tiles and reduction order, so the same bits. H200, Ring-mini
# shapes: down 0.659 -> 0.538 ms, dx 1.129 -> 1.027, G 0.515 -> 0.449 (the pointer kernels
# looped this way got slower: gate-up 1.234 -> 1.327, G 0.533 -> 0.833).
PERSISTENT_GEMMS = ("down", "dx", "down_bwd")
# Expert plan: "torch" (torch.sort + small ops) or "triton" (counting sort, triton_plan.py:
# 0.18 vs 0.48 ms at Ring-mini shapes, the same permutation bitwise).
PLAN = "triton"


def make_plan(ids: torch.Tensor, num_experts: int) -> ExpertPlan:
    """Stable sort of the slots by expert id (equal experts keep slot order)."""
    t, k = ids.shape
    if PLAN == "triton":
        tokens, slots, inverse, offsets = triton_plan.counting_sort(ids, num_experts)
        return ExpertPlan(t, k, num_experts, tokens, slots, offsets, "triton", inverse)
    sorted_ids, order = torch.sort(ids.reshape(-1), stable=True)
    bounds = torch.arange(num_experts + 1, device=ids.device, dtype=sorted_ids.dtype)
    offsets = torch.searchsorted(sorted_ids, bounds)
    return ExpertPlan(t, k, num_experts, (order // k).int(), order.int(), offsets.int())


# ------------------------------------------------------------------------------- kernels
@triton.jit
def _tile(tile_e_ptr, tile_row_ptr, offs_ptr, pid_m, E, BLOCK_M: tl.constexpr):
    """(expert, rows, row mask) of row tile pid_m; expert == E past the last tile."""
    e = tl.load(tile_e_ptr + pid_m)
    row0 = tl.load(tile_row_ptr + pid_m)
    row_end = tl.load(offs_ptr + tl.minimum(e, E - 1) + 1)
    rows = row0 + tl.arange(0, BLOCK_M)
    return e, rows, rows < row_end


@triton.jit
def _mainloop(a_ptr, a_rows, rmask, stride_a, b_ptr, cols, cmask, stride_bk, stride_bn, K,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              EVEN_K: tl.constexpr, PREC: tl.constexpr):
    """acc [BM, BN] fp32 = A[a_rows, :K] @ B[:K, cols] (B element (k, n) at k*sbk + n*sbn)."""
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_a + rk[None, :]
    b_ptrs = b_ptr + rk[:, None] * stride_bk + cols[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=rmask[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=cmask[None, :], other=0.0)
        else:
            km = rk < K - k0
            a = tl.load(a_ptrs, mask=rmask[:, None] & km[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=km[:, None] & cmask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def _swiglu_store(g, u, gu_ptr, h_ptr, rows, rmask, cols, cmask, I):
    """Gate-up epilogue: gu[rows] = [g, u] (kept for the backward), h = silu(g) * u from the
    fp32 accumulators, both in h's dtype."""
    dt = h_ptr.dtype.element_ty
    r64 = rows.to(tl.int64)[:, None]
    omask = rmask[:, None] & cmask[None, :]
    tl.store(gu_ptr + r64 * (2 * I) + cols[None, :], g.to(dt), mask=omask)
    tl.store(gu_ptr + r64 * (2 * I) + I + cols[None, :], u.to(dt), mask=omask)
    silu = g / (1.0 + tl.exp(-g))                 # (tl.sigmoid is a jit call: slow on CPU)
    tl.store(h_ptr + r64 * I + cols[None, :], (silu * u).to(dt), mask=omask)


@triton.jit
def _store_rows(c_ptr, acc, rows, rmask, cols, cmask, N, slot_ptr, SCATTER_C: tl.constexpr):
    """C row r <- acc row (in C's dtype), at slot[r] (SCATTER_C: slot order) or at r."""
    if SCATTER_C:
        c_rows = tl.load(slot_ptr + rows, mask=rmask, other=0).to(tl.int64)
    else:
        c_rows = rows.to(tl.int64)
    tl.store(c_ptr + c_rows[:, None] * N + cols[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, gu_ptr, h_ptr, tok_ptr, tile_e_ptr, tile_row_ptr, offs_ptr,
                    H, I, E, n_rows, GATHER_A: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                    PREC: tl.constexpr):
    """gu[rows] = x[tok] @ [Wg; Wu]_e^T (stored, for the backward); h = silu(g) * u.
    GATHER_A: x is [T, H], row r read at tok[r]; else x holds the rows in expert order."""
    num_n = (I + BLOCK_N - 1) // BLOCK_N
    pid_m = tl.program_id(0) // num_n
    pid_n = tl.program_id(0) % num_n
    e, rows, rmask = _tile(tile_e_ptr, tile_row_ptr, offs_ptr, pid_m, E, BLOCK_M)
    if e >= E:
        return
    if GATHER_A:
        tok = tl.load(tok_ptr + rows, mask=rmask, other=0).to(tl.int64)
    else:
        tok = tl.minimum(rows, n_rows - 1).to(tl.int64)     # in bounds; masked rows unused
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < I
    # B element (k, n) of the gate block is Wg_e[n, k] (row n of gate_proj): at n*H + k.
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tok[:, None] * H + rk[None, :]
    bg_ptrs = w_ptr + e.to(tl.int64) * (2 * I) * H + rk[:, None] + cols[None, :] * H
    g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):   # one A tile feeds both dots
        if EVEN_K:
            a = tl.load(a_ptrs, mask=rmask[:, None], other=0.0)
            bg = tl.load(bg_ptrs, mask=cmask[None, :], other=0.0)
            bu = tl.load(bg_ptrs + I * H, mask=cmask[None, :], other=0.0)
        else:
            km = rk < H - k0
            a = tl.load(a_ptrs, mask=rmask[:, None] & km[None, :], other=0.0)
            bg = tl.load(bg_ptrs, mask=km[:, None] & cmask[None, :], other=0.0)
            bu = tl.load(bg_ptrs + I * H, mask=km[:, None] & cmask[None, :], other=0.0)
        g = tl.dot(a, bg, g, input_precision=PREC)
        u = tl.dot(a, bu, u, input_precision=PREC)
        a_ptrs += BLOCK_K
        bg_ptrs += BLOCK_K
    _swiglu_store(g, u, gu_ptr, h_ptr, rows, rmask, cols, cmask, I)


@triton.jit
def _row_gemm_kernel(a_ptr, b_ptr, c_ptr, tok_ptr, slot_ptr, tile_e_ptr, tile_row_ptr, offs_ptr,
                     N, K, E, n_rows, stride_a, stride_be, stride_bk, stride_bn,
                     GATHER_A: tl.constexpr, SCATTER_C: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     EVEN_K: tl.constexpr, PREC: tl.constexpr):
    """C[rows] = A[rows] @ B_e, rows of expert e. A row r is read at tok[r] (GATHER_A) or r;
    C row r is written at slot[r] (SCATTER_C, slot order) or r (sorted order)."""
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    pid_m = tl.program_id(0) // num_n
    pid_n = tl.program_id(0) % num_n
    e, rows, rmask = _tile(tile_e_ptr, tile_row_ptr, offs_ptr, pid_m, E, BLOCK_M)
    if e >= E:
        return
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    if GATHER_A:
        a_rows = tl.load(tok_ptr + rows, mask=rmask, other=0).to(tl.int64)
    else:
        a_rows = tl.minimum(rows, n_rows - 1).to(tl.int64)   # in bounds; masked rows unused
    b_e = b_ptr + e.to(tl.int64) * stride_be
    acc = _mainloop(a_ptr, a_rows, rmask, stride_a, b_e, cols, cmask, stride_bk, stride_bn,
                    K, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, PREC)
    _store_rows(c_ptr, acc, rows, rmask, cols, cmask, N, slot_ptr, SCATTER_C)


# ------------------------------------------------------------------------------ launchers
def _prec(t: torch.Tensor) -> str:
    return "ieee" if t.dtype == torch.float32 else "tf32"   # fp32 stays fp32 (no TF32)


def gate_up(x, w_gate_up, plan: ExpertPlan, cfg=None, sorted_rows=False):
    """(gu [N, 2I], h [N, I]) in x.dtype, sorted-row order. x: [T, H] (rows gathered by
    token) or, with sorted_rows, [N, H] already in expert order (then TMA where TMA_GEMMS
    asks for it and it can run)."""
    if sorted_rows and _use_tma("gate_up", x, w_gate_up, k_major=True):
        from ring_rl.kernels.moe import triton_tma
        return triton_tma.gate_up(x, w_gate_up, plan, cfg)
    bm, bn, bk, warps, stages = cfg or CONFIGS["gate_up"]
    stages = fit_stages(bm, bn, bk, stages, x.dtype, b_tiles=2)
    e, hid, inter, gu, h = gate_up_outputs(x, w_gate_up, plan)
    te, tr = plan.tiles(bm)
    grid = (te.numel() * triton.cdiv(inter, bn),)
    LAUNCHED["gate_up"] = _gate_up_kernel[grid](
        x, w_gate_up, gu, h, plan.tokens, te, tr, plan.offsets, hid, inter, e,
        plan.num_rows, GATHER_A=not sorted_rows, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        EVEN_K=hid % bk == 0, PREC=_prec(x), num_warps=warps, num_stages=stages)
    return gu, h


def gate_up_outputs(x, w_gate_up, plan: ExpertPlan):
    """(E, H, I, gu [N, 2I], h [N, I]): the gate-up GEMM's shapes and its empty outputs in
    x.dtype (both launchers: pointer and TMA)."""
    e, two_i, hid = w_gate_up.shape
    gu = torch.empty(plan.num_rows, two_i, device=x.device, dtype=x.dtype)
    h = torch.empty(plan.num_rows, two_i // 2, device=x.device, dtype=x.dtype)
    return e, hid, two_i // 2, gu, h


def _use_tma(name: str, a, w, k_major: bool) -> bool:
    """Whether TMA_GEMMS asks for TMA for this GEMM and the TMA kernels can take a [N, K] A
    and the expert weights w (see triton_tma.tma_ok)."""
    if name not in TMA_GEMMS:
        return False
    from ring_rl.kernels.moe import triton_tma
    return triton_tma.tma_ok(a, w, CONFIGS[name + "_tma"][2], k_major)


def sorted_gemm(a, w, plan: ExpertPlan, transpose_w: bool, name: str, scatter_c=True):
    """row_gemm on A rows already in expert order (a [N, K]), with CONFIGS[name]: through
    TMA (CONFIGS[name + '_tma']) where TMA_GEMMS asks for it and it can run."""
    if _use_tma(name, a, w, k_major=transpose_w):
        from ring_rl.kernels.moe import triton_tma
        return triton_tma.row_gemm(a, w, plan, transpose_w, CONFIGS[name + "_tma"], scatter_c,
                                   name)
    return row_gemm(a, w, plan, transpose_w, CONFIGS[name], scatter_c=scatter_c)


def row_gemm(a, w, plan: ExpertPlan, transpose_w: bool, cfg, gather_a=False, scatter_c=True):
    """c [N, n]: c[r] = a[r] @ (w_e^T if transpose_w else w_e) for the rows r of expert e;
    a's row r is a[tok[r]] when gather_a; c is in slot order when scatter_c, else sorted."""
    bm, bn, bk, warps, stages = cfg
    stages = fit_stages(bm, bn, bk, stages, a.dtype)
    e = w.shape[0]
    k = a.shape[1]
    n = w.shape[1] if transpose_w else w.shape[2]
    sbk, sbn = (1, w.shape[2]) if transpose_w else (w.shape[2], 1)
    c = torch.empty(plan.num_rows, n, device=a.device, dtype=a.dtype)
    te, tr = plan.tiles(bm)
    grid = (te.numel() * triton.cdiv(n, bn),)
    LAUNCHED["row_gemm"] = _row_gemm_kernel[grid](
        a, w, c, plan.tokens, plan.slots, te, tr, plan.offsets, n, k, e,
        plan.num_rows, a.stride(0), w.stride(0), sbk, sbn, GATHER_A=gather_a,
        SCATTER_C=scatter_c, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        EVEN_K=k % bk == 0, PREC=_prec(a), num_warps=warps, num_stages=stages)
    return c


def experts_fwd(x, wts, w_gate_up, w_down, plan: ExpertPlan):
    """(y [T, H], gu [N, 2I], xs [N, H] or None): gu, and x's rows in expert order when
    the forward made them (FWD_ROWS / FWD_GEMMS), are saved for the backward."""
    if FWD_ROWS not in ("gather", "sorted") or FWD_GEMMS not in ("triton", "gmm"):
        raise ValueError(f"triton_experts: FWD_ROWS={FWD_ROWS!r} (gather or sorted), "
                         f"FWD_GEMMS={FWD_GEMMS!r} (triton or gmm)")
    gmm = FWD_GEMMS == "gmm" and grouped_mm_ok(x, x.shape[1], w_down.shape[2])
    xs = gather_rows(x, plan) if FWD_ROWS == "sorted" or gmm else None
    if gmm:
        gu = torch._grouped_mm(xs, w_gate_up.transpose(1, 2), offs=plan.ends)
        o = torch._grouped_mm(swiglu_fwd(gu), w_down.transpose(1, 2), offs=plan.ends)
        return combine(o, wts, plan.num_tokens, row_map=plan.inverse), gu, xs
    if xs is None:
        gu, h = gate_up(x, w_gate_up, plan)
    else:
        gu, h = gate_up(xs, w_gate_up, plan, sorted_rows=True)
    o = sorted_gemm(h, w_down, plan, transpose_w=True, name="down")
    return combine(o, wts, plan.num_tokens), gu, xs
