"""Triton kernels for the router: the fp32 logits matmul and the group-limited top-k selection.

Batch invariance (a token's logits and experts do not depend on the other tokens):
- `matmul_fp32` uses the same tiles for every problem size (no size-dependent config, no
  split-K) and walks the reduction dimension in one fixed order, so row m of the result is
  the same sequence of fp32 operations whatever M is. Never TF32: fp32 x fp32 is an IEEE
  FMA dot; with bf16 activations the fp32 weight is split into 3 exact bf16 parts on the
  tensor cores (fp32-accurate; 0.27 ms instead of 1.32 ms for the FMA dot at 16K x 2048 x
  256 on an H100; 0.10 ms on an H200 with the parts split once per call, PRESPLIT).
- `select_experts` works on one row at a time (rows are independent lanes of a block).
The gate weight's gradient dl^T x reduces over the T tokens with only E x H outputs (128
tiles: too few programs for 132 SMs, each looping over all tokens), so it is split over the
tokens: fp32 partials [S, E, H], then one kernel sums them in the fixed order s = 0..S-1
(deterministic; the split depends on T only, and a gradient need not be batch invariant).

Selection maths and tie rule: see reference.py. The kernel adds the bias in fp32 exactly as
the reference does, sums each group's top two as (largest + second), and picks maxima with
"first index among equals", so it returns the same ids as the reference bitwise.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Fixed tiles for the router matmul (never chosen from the problem size: batch invariance).
# Forward at Ring-mini shapes on an H200: 0.097 ms pre-split at (128, 128, 8 warps) against
# 0.124 at (64, 128, 4) and 0.267 with the split in every program (benchmarks/results/moe.md).
MM_BLOCK_M, MM_BLOCK_N, MM_BLOCK_K, MM_WARPS = 128, 128, 64, 8
# bf16 activations: split the fp32 gate weight (and, in the backward, dlogits) into its bf16
# parts once per call (`split_bf16`) instead of in every program of the matmul: the same
# parts and dots, so the same bits; the backward's dx 0.118 vs 0.175 ms, dW 0.118 vs 0.154.
PRESPLIT = True
# Rows per program in the selection kernel; SELECT_3D: the group scores on a 3D view where
# the sizes are powers of two (else one group at a time).
SELECT_BLOCK_T = 16
SELECT_3D = True
# Gate-weight gradient: tokens per split of the reduction (0: no split) and the most splits.
# fp32 partials summed in a fixed order; 2048 rows: 0.152 vs 0.288 ms unsplit at Ring-mini
# shapes on an H100 (`benchmarks/moe.py --variants`, benchmarks/results/moe.md).
DW_SPLIT_ROWS, DW_MAX_SPLITS = 2048, 8
# Tiles (BLOCK_M, BLOCK_N, warps) of the router's dx = dl @ W in the backward (a gradient: no
# batch invariance needed, so not bound to the forward's tiles): 0.185 ms vs 0.261 for
# (64, 128, 4) in the same `--variants` run.
DX_TILES = (128, 128, 8)


@triton.jit
def _bf16_split(v):
    """fp32 v == hi + mid + lo exactly, each part bf16 (8 significant bits apiece)."""
    hi = v.to(tl.bfloat16)
    r = v - hi.to(tl.float32)
    mid = r.to(tl.bfloat16)
    lo = (r - mid.to(tl.float32)).to(tl.bfloat16)
    return hi, mid, lo


@triton.jit
def _matmul_fp32_kernel(a_ptr, b_ptr, c_ptr, M, N, K, K_SPLIT,
                        stride_am, stride_ak, stride_bk, stride_bn, stride_ap, stride_bp,
                        SPLIT_A: tl.constexpr, SPLIT_B: tl.constexpr, PRE_A: tl.constexpr,
                        PRE_B: tl.constexpr, EXACT: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """C = A @ B in fp32. EXACT: IEEE fp32 FMA dot. Otherwise bf16 tensor-core dots: an fp32
    operand (SPLIT_*) is split into three bf16 parts, a bf16 operand is used as is, and the
    partial products are summed in fp32 (products of bf16 are exact in fp32, so with one
    operand split this is an fp32 GEMM up to summation order). With both operands split only
    the hi*hi, hi*mid and mid*hi terms are kept (~2^-16 relative): used for dx, which is
    rounded to bf16 anyway. PRE_*: that operand comes already split (`split_bf16`: parts
    hi, mid, lo at stride_*p), so the tiles are loaded instead of split in every program --
    the same parts and the same dots in the same order, hence the same bits. Program
    (., ., s) reduces k in [s*K_SPLIT, (s+1)*K_SPLIT) into the partial c[s] (one split: the
    whole K, the same operations as ever). C is stored in c's dtype."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    k_lo = tl.program_id(2) * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = (a_ptr + rm[:, None].to(tl.int64) * stride_am
              + (k_lo + rk[None, :]).to(tl.int64) * stride_ak)
    b_ptrs = (b_ptr + (k_lo + rk[:, None]).to(tl.int64) * stride_bk
              + rn[None, :].to(tl.int64) * stride_bn)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        km = rk < k_hi - k0
        am = (rm[:, None] < M) & km[None, :]
        bm = km[:, None] & (rn[None, :] < N)
        a = tl.load(a_ptrs, mask=am, other=0.0)
        b = tl.load(b_ptrs, mask=bm, other=0.0)
        if EXACT:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        elif not SPLIT_A and not SPLIT_B:
            acc = tl.dot(a, b, acc)
        elif SPLIT_A and SPLIT_B:      # only for a result rounded to bf16 (see matmul_fp32)
            a0, a1 = _hi_mid(a, a_ptrs, am, stride_ap, PRE_A)
            b0, b1 = _hi_mid(b, b_ptrs, bm, stride_bp, PRE_B)
            acc = tl.dot(a0, b1, acc)
            acc = tl.dot(a1, b0, acc)
            acc = tl.dot(a0, b0, acc)
        elif SPLIT_B:
            b0, b1, b2 = _parts(b, b_ptrs, bm, stride_bp, PRE_B)
            a0 = a.to(tl.bfloat16)
            acc = tl.dot(a0, b2, acc)
            acc = tl.dot(a0, b1, acc)
            acc = tl.dot(a0, b0, acc)
        else:
            a0, a1, a2 = _parts(a, a_ptrs, am, stride_ap, PRE_A)
            b0 = b.to(tl.bfloat16)
            acc = tl.dot(a2, b0, acc)
            acc = tl.dot(a1, b0, acc)
            acc = tl.dot(a0, b0, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c_ptrs = (c_ptr + tl.program_id(2).to(tl.int64) * M * N + rm[:, None].to(tl.int64) * N
              + rn[None, :])
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _parts(v, ptrs, mask, part_stride, PRE: tl.constexpr):
    """(hi, mid, lo) bf16 of a tile: v is part hi of a pre-split operand (the other two
    are loaded) or the fp32 tile itself (split here)."""
    if PRE:
        return (v, tl.load(ptrs + part_stride, mask=mask, other=0.0),
                tl.load(ptrs + 2 * part_stride, mask=mask, other=0.0))
    return _bf16_split(v)


@triton.jit
def _hi_mid(v, ptrs, mask, part_stride, PRE: tl.constexpr):
    """(hi, mid) bf16 of a tile (see _parts; lo is not needed)."""
    if PRE:
        return v, tl.load(ptrs + part_stride, mask=mask, other=0.0)
    hi, mid, _ = _bf16_split(v)
    return hi, mid


@triton.jit
def _split_kernel(v_ptr, p_ptr, n, BLOCK: tl.constexpr):
    """p[0], p[1], p[2] = the bf16 parts hi, mid, lo of fp32 v (flat, n elements)."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    hi, mid, lo = _bf16_split(tl.load(v_ptr + i, mask=m, other=0.0))
    tl.store(p_ptr + i, hi, mask=m)
    tl.store(p_ptr + n + i, mid, mask=m)
    tl.store(p_ptr + 2 * n + i, lo, mask=m)


def split_bf16(v: torch.Tensor) -> torch.Tensor:
    """[3, *v.shape] bf16: the exact parts hi, mid, lo of fp32 v (hi + mid + lo == v), the
    same parts as the matmul kernel's in-register split. matmul_fp32 takes such a stack
    as an operand that stands for v."""
    v = v.float().contiguous()
    parts = torch.empty((3, *v.shape), device=v.device, dtype=torch.bfloat16)
    if v.numel():
        _split_kernel[(triton.cdiv(v.numel(), 1024),)](v, parts, v.numel(), BLOCK=1024,
                                                       num_warps=4)
    return parts


@triton.jit
def _sum_splits_kernel(p_ptr, c_ptr, n, S, BLOCK: tl.constexpr):
    """c[i] = p[0, i] + p[1, i] + ... + p[S-1, i], in that order (fp32)."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    acc = tl.load(p_ptr + i, mask=m, other=0.0)
    for s in range(1, S):
        acc += tl.load(p_ptr + s * n + i, mask=m, other=0.0)
    tl.store(c_ptr + i, acc, mask=m)


def matmul_fp32(a: torch.Tensor, b: torch.Tensor, exact: bool | None = None,
                tiles: tuple[int, int] | None = None, splits: int = 1,
                warps: int | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[M, N] = a.float() @ b.float() for a [M, K], b [K, N] of any strides, fp32-accurate.

    Operands are fp32 or bf16. With a bf16 operand (the model's activations) the product runs
    on bf16 tensor cores with the fp32 operand split into three exact bf16 parts; with fp32
    operands only it is an IEEE fp32 FMA dot (the Triton interpreter's bf16 dot is unusable,
    so CPU tests take this path). An fp32 operand may also come pre-split: a [3, M, K] /
    [3, K, N] bf16 stack from `split_bf16` (any strides), the same result bitwise as its fp32
    tensor on the tensor-core path. `exact` forces one or the other (default: exact when
    both operands are fp32); other dtypes are converted to fp32 first. `tiles` (BLOCK_M,
    BLOCK_N) and `warps`: keep the defaults (MM_*) wherever batch invariance matters (the
    forward). `splits` > 1:
    the reduction is cut into that many BLOCK_K-aligned ranges whose fp32 partials are summed
    in order (deterministic, but the result depends on K: not for the forward). out_dtype:
    the result is rounded to it in the kernel (no fp32 copy), with one split only."""
    tiles = tiles or (MM_BLOCK_M, MM_BLOCK_N)
    warps = warps or MM_WARPS
    pre_a, pre_b = a.dim() == 3, b.dim() == 3
    m, k = a.shape[-2:]
    n = b.shape[-1]
    c = torch.empty(m, n, device=a.device, dtype=out_dtype)
    if m == 0 or n == 0:
        return c
    a = a if a.dtype in (torch.float32, torch.bfloat16) else a.float()
    b = b if b.dtype in (torch.float32, torch.bfloat16) else b.float()
    if exact is None:
        exact = a.dtype == b.dtype == torch.float32
    if exact and (pre_a or pre_b):
        raise ValueError("matmul_fp32: pre-split operands run on the tensor cores only")
    k_split = triton.cdiv(triton.cdiv(max(k, 1), max(splits, 1)), MM_BLOCK_K) * MM_BLOCK_K
    splits = triton.cdiv(max(k, 1), k_split)
    if splits > 1 and out_dtype != torch.float32:
        raise ValueError("matmul_fp32: split reductions return fp32")
    out = c if splits == 1 else torch.empty(splits, m, n, device=a.device, dtype=torch.float32)
    grid = (triton.cdiv(m, tiles[0]), triton.cdiv(n, tiles[1]), splits)
    _matmul_fp32_kernel[grid](a, b, out, m, n, k, k_split, a.stride(-2), a.stride(-1),
                              b.stride(-2), b.stride(-1), a.stride(0) if pre_a else 0,
                              b.stride(0) if pre_b else 0,
                              SPLIT_A=pre_a or a.dtype == torch.float32,
                              SPLIT_B=pre_b or b.dtype == torch.float32, PRE_A=pre_a,
                              PRE_B=pre_b, EXACT=exact, BLOCK_M=tiles[0], BLOCK_N=tiles[1],
                              BLOCK_K=MM_BLOCK_K, num_warps=warps)
    if splits > 1:
        _sum_splits_kernel[(triton.cdiv(m * n, 1024),)](out, c, m * n, splits, BLOCK=1024,
                                                         num_warps=4)
    return c


def dw_splits(num_tokens: int) -> int:
    """Splits of the gate-weight gradient's reduction over num_tokens (DW_SPLIT_ROWS each)."""
    if DW_SPLIT_ROWS <= 0:
        return 1
    return max(1, min(DW_MAX_SPLITS, num_tokens // DW_SPLIT_ROWS))


@triton.jit
def _select_kernel(s_ptr, bias_ptr, ids_ptr, T,
                   E: tl.constexpr, BLOCK_E: tl.constexpr, GROUP_SIZE: tl.constexpr,
                   N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, TOP_K: tl.constexpr,
                   HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, GROUPS_3D: tl.constexpr):
    NEG: tl.constexpr = float("-inf")
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    rmask = rows < T
    cmask = cols < E
    v = tl.load(s_ptr + rows[:, None].to(tl.int64) * E + cols[None, :],
                mask=rmask[:, None] & cmask[None, :], other=NEG)
    if HAS_BIAS:
        v = v + tl.load(bias_ptr + cols, mask=cmask, other=0.0)[None, :]
    grp = cols // GROUP_SIZE                  # padding columns land in groups >= N_GROUP
    if N_GROUP > 1 and GROUPS_3D:
        # The same choices on a [rows, groups, experts of a group] view, every group at once
        # (E = N_GROUP * GROUP_SIZE, both powers of two): 0.07 -> 0.04 ms at Ring-mini shapes.
        v3 = tl.reshape(v, (BLOCK_T, N_GROUP, GROUP_SIZE))
        gcol = tl.arange(0, GROUP_SIZE)[None, None, :]
        m1 = tl.max(v3, axis=2)
        i1 = tl.min(tl.where(v3 == m1[:, :, None], gcol, GROUP_SIZE), axis=2)
        m2 = tl.max(tl.where(gcol == i1[:, :, None], NEG, v3), axis=2)
        gs = m1 + m2                          # [rows, groups]
        gidx = tl.arange(0, N_GROUP)[None, :]
        keep_g = tl.zeros((BLOCK_T, N_GROUP), dtype=tl.int1)
        for _ in tl.static_range(TOPK_GROUP):
            cand = tl.where(keep_g, NEG, gs)
            best = tl.max(cand, axis=1)
            gbest = tl.min(tl.where(cand == best[:, None], gidx, N_GROUP), axis=1)
            keep_g = keep_g | (gidx == gbest[:, None])
        keep3 = tl.broadcast_to(keep_g[:, :, None], (BLOCK_T, N_GROUP, GROUP_SIZE))
        v = tl.where(tl.reshape(keep3, (BLOCK_T, BLOCK_E)), v, NEG)
    elif N_GROUP > 1:
        # Every expert carries its group's score (sum of the group's top two).
        gscore = tl.full((BLOCK_T, BLOCK_E), NEG, tl.float32)
        for g in tl.static_range(N_GROUP):
            in_g = (grp == g)[None, :]
            vg = tl.where(in_g, v, NEG)
            m1 = tl.max(vg, axis=1)
            i1 = tl.min(tl.where(vg == m1[:, None], cols[None, :], BLOCK_E), axis=1)
            m2 = tl.max(tl.where(cols[None, :] == i1[:, None], NEG, vg), axis=1)
            gscore = tl.where(in_g, (m1 + m2)[:, None], gscore)
        keep = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.int1)
        for _ in tl.static_range(TOPK_GROUP):
            cand = tl.where(keep, NEG, gscore)
            best = tl.max(cand, axis=1)
            gbest = tl.min(tl.where(cand == best[:, None], grp[None, :], N_GROUP + 1), axis=1)
            keep = keep | (grp[None, :] == gbest[:, None])
        v = tl.where(keep, v, NEG)
    for j in tl.static_range(TOP_K):
        m = tl.max(v, axis=1)     # the first (lowest) column holding the max: ties -> low
        idx = tl.min(tl.where(v == m[:, None], cols[None, :], BLOCK_E), axis=1)
        tl.store(ids_ptr + rows.to(tl.int64) * TOP_K + j, idx.to(tl.int64), mask=rmask)
        v = tl.where(cols[None, :] == idx[:, None], NEG, v)


def select_experts(scores: torch.Tensor, expert_bias: torch.Tensor | None, top_k: int,
                   n_group: int, topk_group: int) -> torch.Tensor:
    """ids int64 [T, top_k]: group-limited top-k of scores + bias (scores fp32 [T, E])."""
    t, e = scores.shape
    size = e // n_group
    s = scores.float().contiguous()
    ids = torch.empty(t, top_k, device=scores.device, dtype=torch.int64)
    if t == 0:
        return ids
    bias = s if expert_bias is None else expert_bias.detach().float().contiguous()
    grid = (triton.cdiv(t, SELECT_BLOCK_T),)
    _select_kernel[grid](s, bias, ids, t, E=e, BLOCK_E=triton.next_power_of_2(e),
                         GROUP_SIZE=size, N_GROUP=n_group, TOPK_GROUP=topk_group, TOP_K=top_k,
                         HAS_BIAS=expert_bias is not None, BLOCK_T=SELECT_BLOCK_T,
                         GROUPS_3D=SELECT_3D and e == triton.next_power_of_2(e)
                         and n_group == triton.next_power_of_2(n_group), num_warps=4)
    return ids


@triton.jit
def _weights_fwd_kernel(s_ptr, ids_ptr, w_ptr, T, E, scale, K: tl.constexpr,
                        BLOCK_K: tl.constexpr, NORM: tl.constexpr, BLOCK_T: tl.constexpr):
    """w[t, j] = s[t, ids[t, j]] / (s_0 + ... + s_{k-1}) * scale, the sum left to right: the
    same fp32 operations as reference.route_weights, so the same bits."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    kc = tl.arange(0, BLOCK_K)
    rmask = rows < T
    r64 = rows.to(tl.int64)
    sel = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    total = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for j in tl.static_range(K):
        e = tl.load(ids_ptr + r64 * K + j, mask=rmask, other=0)
        sj = tl.load(s_ptr + r64 * E + e, mask=rmask, other=1.0)
        total = total + sj           # 0 + s_0 is exact: the same sum as the reference
        sel = tl.where(kc[None, :] == j, sj[:, None], sel)
    if NORM:   # IEEE-rounded division, as torch's (Triton's `/` is approximate on GPUs)
        sel = tl.math.div_rn(sel, tl.broadcast_to(total[:, None], (BLOCK_T, BLOCK_K)))
    tl.store(w_ptr + r64[:, None] * K + kc[None, :], sel * scale,
             mask=rmask[:, None] & (kc < K)[None, :])


@triton.jit
def _weights_bwd_kernel(s_ptr, ids_ptr, dw_ptr, ds_ptr, T, E, scale, K: tl.constexpr,
                        NORM: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr):
    """ds [T, E] (dense, written once) from dw [T, k]: with S = sum_i s_i and
    D = sum_i dw_i s_i, ds[ids_j] += scale * (dw_j / S - D / S^2) (norm) or scale * dw_j."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    rmask = rows < T
    r64 = rows.to(tl.int64)
    total = tl.zeros((BLOCK_T,), dtype=tl.float32)
    dot = tl.zeros((BLOCK_T,), dtype=tl.float32)
    if NORM:
        for j in tl.static_range(K):
            e = tl.load(ids_ptr + r64 * K + j, mask=rmask, other=0)
            sj = tl.load(s_ptr + r64 * E + e, mask=rmask, other=1.0)
            total += sj
            dot += sj * tl.load(dw_ptr + r64 * K + j, mask=rmask, other=0.0)
    ds = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for j in tl.static_range(K):
        e = tl.load(ids_ptr + r64 * K + j, mask=rmask, other=0)
        g = tl.load(dw_ptr + r64 * K + j, mask=rmask, other=0.0)
        if NORM:
            g = scale * (g / total - dot / (total * total))
        else:
            g = scale * g
        ds += tl.where(cols[None, :] == e[:, None], g[:, None], 0.0)   # repeats add up
    tl.store(ds_ptr + r64[:, None] * E + cols[None, :], ds,
             mask=rmask[:, None] & (cols < E)[None, :])


class RouteWeightsFunction(torch.autograd.Function):
    """weights from (scores, ids) with a Triton forward and backward (2 launches instead of
    the ~20 small ops of the autograd graph of reference.route_weights)."""

    @staticmethod
    def forward(ctx, scores, ids, scale, norm):
        t, e = scores.shape
        k = ids.shape[1]
        s, ids = scores.contiguous(), ids.contiguous()
        w = torch.empty(t, k, device=s.device, dtype=torch.float32)
        if t:
            _weights_fwd_kernel[(triton.cdiv(t, 64),)](
                s, ids, w, t, e, float(scale), K=k, BLOCK_K=triton.next_power_of_2(k),
                NORM=norm, BLOCK_T=64, num_warps=4)
        ctx.save_for_backward(s, ids)
        ctx.scale, ctx.norm = float(scale), norm
        return w

    @staticmethod
    def backward(ctx, dw):
        s, ids = ctx.saved_tensors
        t, e = s.shape
        ds = torch.empty_like(s)
        if t:
            _weights_bwd_kernel[(triton.cdiv(t, SELECT_BLOCK_T),)](
                s, ids, dw.float().contiguous(), ds, t, e, ctx.scale, K=ids.shape[1],
                NORM=ctx.norm, BLOCK_E=triton.next_power_of_2(e), BLOCK_T=SELECT_BLOCK_T,
                num_warps=4)
        return ds, None, None, None


def route_weights(scores, ids, routed_scaling_factor, norm_topk_prob=True):
    """Triton twin of reference.route_weights (same forward bits, analytic backward)."""
    return RouteWeightsFunction.apply(scores, ids, routed_scaling_factor, norm_topk_prob)
