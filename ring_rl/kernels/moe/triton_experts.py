"""Triton grouped GEMMs for the routed SwiGLU experts (forward and backward).

Layout. The T*k slots (slot = t*k + j) are sorted stably by expert (`make_plan`); "rows" are
positions in that order, expert e owning rows offsets[e]:offsets[e+1]. A row-GEMM program
owns one tile of BLOCK_M rows of a single expert (a per-tile schedule: tile -> expert, first
row; no padding copies) and one BLOCK_N column block. Rows read the token activations through
the token index (gather in the load) and write slot-ordered outputs through the slot index
(scatter in the store), so these kernels never make a permuted copy of x or of the outputs.

Forward:  gu, h = gate_up(x[tok]) (+ SwiGLU epilogue)  -> o[slot] = h @ Wd^T -> y = combine(o, w)
Backward (triton_experts_bwd.py): G = dy[tok] @ Wd, then the SwiGLU backward (dgu, hw = w*h
          and the routing-weight gradient sum(G*h)); dxs[slot] = dgu @ Wgu, dx = combine(dxs);
          dWd_e = dy[tok]^T @ hw, dWgu_e = dgu^T @ x[tok] (per expert).
Saved for the backward: x, the weights and gu [T*k, 2I] (h is recomputed from gu).
Determinism: every output element is written by exactly one program, weight gradients loop
over the expert's rows in order (no split-K), per-token sums run j = 0..k-1: no atomics.
The backward's GEMMs can also run through torch._grouped_mm (BWD_GEMMS, see
triton_experts_bwd.py), on x and dy rows copied in expert order; by default the weight
gradients do. The forward always runs these kernels (batch invariance: fixed tiles).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from ring_rl.kernels.moe import triton_plan
from ring_rl.kernels.moe.tile_fit import fit_stages

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per kernel; chosen on an H100 with
# `benchmarks/moe.py --sweep` (see benchmarks/results/moe.md). Tests may shrink them.
CONFIGS = {
    "gate_up": (128, 128, 64, 8, 3),     # x[tok] @ Wgu^T, two accumulators (gate, up)
    "down": (128, 256, 64, 8, 3),        # h @ Wd^T -> o[slot]
    "down_bwd": (128, 256, 64, 8, 4),    # dy[tok] @ Wd (+ SwiGLU backward when fused)
    "swiglu_bwd": (8, 0, 0, 8, 1),       # rows per program of the unfused SwiGLU backward
    "dx": (128, 256, 64, 8, 4),          # dgu @ Wgu -> dxs[slot]
    "wgrad": (128, 128, 64, 8, 3),       # per-expert A^T @ B over the expert's rows
    "combine": (16, 256, 0, 4, 1),       # (tokens, hidden) tile of the per-token sum
    "gather_rows": (8, 1024, 0, 4, 1),   # (rows, columns) tile of the sorted-row copy
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
# Expert plan: "torch" (torch.sort + small ops) or "triton" (counting sort, triton_plan.py:
# 0.18 vs 0.48 ms at Ring-mini shapes, the same permutation bitwise).
PLAN = "triton"


@dataclass
class ExpertPlan:
    """The slot permutation of one routing: sorted rows -> token, slot; expert offsets."""
    num_tokens: int
    top_k: int
    num_experts: int
    tokens: torch.Tensor          # int32 [N]: token of each sorted row
    slots: torch.Tensor           # int32 [N]: slot (t*k + j) of each sorted row
    offsets: torch.Tensor         # int32 [E+1]
    method: str = "torch"         # how tiles() is computed ("torch" or "triton")
    _inverse: torch.Tensor | None = None
    _cache: dict = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        return self.num_tokens * self.top_k

    @property
    def inverse(self) -> torch.Tensor:
        """int32 [N]: the sorted row of each slot (slot order -> sorted order)."""
        if self._inverse is None:
            inv = torch.empty_like(self.slots)
            inv[self.slots.long()] = torch.arange(self.num_rows, device=inv.device,
                                                  dtype=inv.dtype)
            self._inverse = inv
        return self._inverse

    @property
    def ends(self) -> torch.Tensor:
        """int32 [E]: offsets[1:], torch._grouped_mm's `offs` (end row of each expert)."""
        if "ends" not in self._cache:
            self._cache["ends"] = self.offsets[1:].contiguous()
        return self._cache["ends"]

    @property
    def by_load(self) -> torch.Tensor:
        """int32 [E]: experts, most rows first (the Triton weight-gradient order)."""
        if "by_load" not in self._cache:
            counts = self.offsets[1:] - self.offsets[:-1]
            self._cache["by_load"] = torch.sort(counts, descending=True,
                                                stable=True).indices.int()
        return self._cache["by_load"]

    def tiles(self, block_m: int):
        """(tile_expert, tile_row) int32 [bound]: expert and first row of each BLOCK_M tile;
        tiles past the last hold expert E (the program exits). bound needs no host sync."""
        key = ("tiles", block_m)
        if key not in self._cache:
            e = self.num_experts
            bound = triton.cdiv(self.num_rows, block_m) + e
            if self.method == "triton":
                self._cache[key] = triton_plan.tile_plan(self.offsets, block_m, bound)
            else:
                off = self.offsets.long()
                ntiles = (off[1:] - off[:-1] + block_m - 1) // block_m
                cum = ntiles.cumsum(0)
                tid = torch.arange(bound, device=off.device)
                te = torch.searchsorted(cum, tid, right=True)
                tc = te.clamp(max=e - 1)
                row = off[tc] + (tid - (cum - ntiles)[tc]) * block_m
                self._cache[key] = (te.int(), row.int())
        return self._cache[key]


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
def _gate_up_kernel(x_ptr, w_ptr, gu_ptr, h_ptr, tok_ptr, tile_e_ptr, tile_row_ptr, offs_ptr,
                    H, I, E, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PREC: tl.constexpr):
    """gu[rows] = x[tok] @ [Wg; Wu]_e^T (stored, for the backward); h = silu(g) * u."""
    num_n = (I + BLOCK_N - 1) // BLOCK_N
    pid_m = tl.program_id(0) // num_n
    pid_n = tl.program_id(0) % num_n
    e, rows, rmask = _tile(tile_e_ptr, tile_row_ptr, offs_ptr, pid_m, E, BLOCK_M)
    if e >= E:
        return
    tok = tl.load(tok_ptr + rows, mask=rmask, other=0).to(tl.int64)
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
    dt = h_ptr.dtype.element_ty
    r64 = rows.to(tl.int64)[:, None]
    omask = rmask[:, None] & cmask[None, :]
    tl.store(gu_ptr + r64 * (2 * I) + cols[None, :], g.to(dt), mask=omask)
    tl.store(gu_ptr + r64 * (2 * I) + I + cols[None, :], u.to(dt), mask=omask)
    silu = g / (1.0 + tl.exp(-g))                 # (tl.sigmoid is a jit call: slow on CPU)
    tl.store(h_ptr + r64 * I + cols[None, :], (silu * u).to(dt), mask=omask)


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
    if SCATTER_C:
        c_rows = tl.load(slot_ptr + rows, mask=rmask, other=0).to(tl.int64)
    else:
        c_rows = rows.to(tl.int64)
    tl.store(c_ptr + c_rows[:, None] * N + cols[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


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
def _prec(t: torch.Tensor) -> str:
    return "ieee" if t.dtype == torch.float32 else "tf32"   # fp32 stays fp32 (no TF32)


def gate_up(x, w_gate_up, plan: ExpertPlan, cfg=None):
    """(gu [N, 2I], h [N, I]) in x.dtype, sorted-row order."""
    bm, bn, bk, warps, stages = cfg or CONFIGS["gate_up"]
    stages = fit_stages(bm, bn, bk, stages, x.dtype, b_tiles=2)
    e, two_i, hid = w_gate_up.shape
    inter = two_i // 2
    gu = torch.empty(plan.num_rows, two_i, device=x.device, dtype=x.dtype)
    h = torch.empty(plan.num_rows, inter, device=x.device, dtype=x.dtype)
    te, tr = plan.tiles(bm)
    grid = (te.numel() * triton.cdiv(inter, bn),)
    LAUNCHED["gate_up"] = _gate_up_kernel[grid](
        x, w_gate_up, gu, h, plan.tokens, te, tr, plan.offsets, hid, inter, e, BLOCK_M=bm,
        BLOCK_N=bn, BLOCK_K=bk, EVEN_K=hid % bk == 0, PREC=_prec(x), num_warps=warps,
        num_stages=stages)
    return gu, h


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


def experts_fwd(x, wts, w_gate_up, w_down, plan: ExpertPlan):
    """(y [T, H], gu [N, 2I] saved for the backward)."""
    gu, h = gate_up(x, w_gate_up, plan)
    o = row_gemm(h, w_down, plan, transpose_w=True, cfg=CONFIGS["down"])
    return combine(o, wts, plan.num_tokens), gu

