"""Row GEMMs of the routed experts on rows already in expert order, with TMA tile loads
(`triton_experts.TMA_GEMMS`; Hopper and later).

The pointer kernels of triton_experts.py read A rows through a token index (a gather in the
load), which the tensor-memory accelerator cannot do. Where the A rows are contiguous in
expert order -- h, dgu, and the x / dy rows once copied -- a program's [BLOCK_M, BLOCK_K]
A tile is one TMA box at (its first row, k), and expert e's weight tile a box of the weights
viewed as [E * rows, cols]. A tile's rows past its expert's last belong to the next expert
(or lie past the end and are zero-filled): they are computed and masked at the store, like
the pointer kernels' masked rows. Every row's sum runs over k in the same BLOCK_K steps
whatever the batch, so the forward stays batch invariant; no atomics, as everywhere here.
The row GEMMs run one program per (row tile, column block), or as persistent kernels
(`triton_experts.PERSISTENT_GEMMS`): one program per SM walking the tiles in use, whose
count the tile plan leaves on the device (no host sync), with the same tiles and sums.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ring_rl.kernels.moe import triton_experts as fx
from ring_rl.kernels.moe.tile_fit import fit_stages
from ring_rl.kernels.moe.triton_experts import (
    CONFIGS,
    LAUNCHED,
    ExpertPlan,
    _prec,
    _store_rows,
    _swiglu_store,
    _tile,
    gate_up_outputs,
)


@triton.jit
def _row_gemm_tma_tile(a_desc, b_desc, c_ptr, slot_ptr, tile_e_ptr, tile_row_ptr, offs_ptr,
                       tile, N, K, E, B_ROWS, B_KMAJOR: tl.constexpr, SCATTER_C: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       PREC: tl.constexpr):
    """C[rows] = A[rows] @ B_e for the rows of expert e in row tile tile // num_n. B_KMAJOR:
    w_e is stored [N, K] and its tile is the box (e*B_ROWS + n, k) of the [E*N, K] view
    (dotted transposed); else w_e is [K, N] and the box is (e*B_ROWS + k, n) of the [E*K, N]
    view (K % BLOCK_K == 0, or a box would reach into the next expert's rows)."""
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    pid_m = tile // num_n
    e, rows, rmask = _tile(tile_e_ptr, tile_row_ptr, offs_ptr, pid_m, E, BLOCK_M)
    row0 = tl.load(tile_row_ptr + pid_m)
    n0 = (tile % num_n) * BLOCK_N
    b_row = e * B_ROWS
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for ki in range((K + BLOCK_K - 1) // BLOCK_K):
        a = a_desc.load([row0, ki * BLOCK_K])
        if B_KMAJOR:
            acc = tl.dot(a, b_desc.load([b_row + n0, ki * BLOCK_K]).T, acc,
                         input_precision=PREC)
        else:
            acc = tl.dot(a, b_desc.load([b_row + ki * BLOCK_K, n0]), acc,
                         input_precision=PREC)
    cols = n0 + tl.arange(0, BLOCK_N)
    _store_rows(c_ptr, acc, rows, rmask, cols, cols < N, N, slot_ptr, SCATTER_C)


@triton.jit
def _row_gemm_tma_kernel(a_desc, b_desc, c_ptr, slot_ptr, tile_e_ptr, tile_row_ptr, offs_ptr,
                         count_ptr, N, K, E, B_ROWS, B_KMAJOR: tl.constexpr,
                         SCATTER_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, PREC: tl.constexpr, PROGRAMS: tl.constexpr):
    """One (row tile, column block) per program (PROGRAMS = 0), or PROGRAMS persistent
    programs looping over the tiles in use (triton_experts.PERSISTENT_GEMMS)."""
    if PROGRAMS == 0:
        num_n = (N + BLOCK_N - 1) // BLOCK_N
        if tl.load(tile_e_ptr + tl.program_id(0) // num_n) < E:
            _row_gemm_tma_tile(a_desc, b_desc, c_ptr, slot_ptr, tile_e_ptr, tile_row_ptr,
                               offs_ptr, tl.program_id(0), N, K, E, B_ROWS, B_KMAJOR,
                               SCATTER_C, BLOCK_M, BLOCK_N, BLOCK_K, PREC)
    else:
        total = tl.load(count_ptr) * ((N + BLOCK_N - 1) // BLOCK_N)
        for t in tl.range(tl.program_id(0), total, PROGRAMS, flatten=True):
            _row_gemm_tma_tile(a_desc, b_desc, c_ptr, slot_ptr, tile_e_ptr, tile_row_ptr,
                               offs_ptr, t, N, K, E, B_ROWS, B_KMAJOR, SCATTER_C, BLOCK_M,
                               BLOCK_N, BLOCK_K, PREC)


@triton.jit
def _gate_up_tma_kernel(a_desc, w_desc, gu_ptr, h_ptr, tile_e_ptr, tile_row_ptr, offs_ptr,
                        H, I, E, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    """gu[rows] = xs[rows] @ [Wg; Wu]_e^T and h = silu(g) * u (the epilogue of
    triton_experts._gate_up_kernel): gate rows e*2I + n, up rows e*2I + I + n of the
    [E*2I, H] weight view."""
    num_n = (I + BLOCK_N - 1) // BLOCK_N
    pid_m = tl.program_id(0) // num_n
    pid_n = tl.program_id(0) % num_n
    e, rows, rmask = _tile(tile_e_ptr, tile_row_ptr, offs_ptr, pid_m, E, BLOCK_M)
    if e >= E:
        return
    row0 = tl.load(tile_row_ptr + pid_m)
    n0 = pid_n * BLOCK_N
    g_row = e * 2 * I + n0
    g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):   # one A tile feeds both dots
        a = a_desc.load([row0, k0])
        g = tl.dot(a, w_desc.load([g_row, k0]).T, g, input_precision=PREC)
        u = tl.dot(a, w_desc.load([g_row + I, k0]).T, u, input_precision=PREC)
    cols = n0 + tl.arange(0, BLOCK_N)
    _swiglu_store(g, u, gu_ptr, h_ptr, rows, rmask, cols, cols < I, I)


def tma_ok(a: torch.Tensor, w: torch.Tensor, block_k: int, k_major: bool) -> bool:
    """Whether the TMA kernels can take A [N, K] and the weights w [E, ., .]: Hopper or
    later (or the interpreter), 16-bit operands on a GPU, contiguous with 16-byte rows, and
    for weights stored [K, N] a K that BLOCK_K divides."""
    if a.is_cuda and torch.cuda.get_device_capability(a.device)[0] < 9:
        return False
    # The tiles are sized for bf16. fp32 boxes (fp32 models: GPU tests, references) asked an
    # H200 for 262 KB of shared memory (limit 227 KB) even at the stages fit_stages allows,
    # as TMA keeps every stage's boxes resident: fp32 takes the pointer kernels.
    if a.is_cuda and a.element_size() != 2:
        return False
    if not (a.is_contiguous() and w.is_contiguous()) or a.dtype != w.dtype:
        return False
    if a.shape[1] * a.element_size() % 16 or w.shape[2] * w.element_size() % 16:
        return False
    return k_major or a.shape[1] % block_k == 0


def _desc(t: torch.Tensor, block) -> TensorDescriptor:
    return TensorDescriptor(t, list(t.shape), list(t.stride()), list(block))


def row_gemm(a, w, plan: ExpertPlan, transpose_w: bool, cfg, scatter_c=True, name=None):
    """c [N, n]: c[r] = a[r] @ (w_e^T if transpose_w else w_e), a [N, K] in expert order;
    c in slot order when scatter_c, else sorted (triton_experts.row_gemm's contract).
    name: the GEMM's name ("down", "dx", "down_bwd"), persistent if in PERSISTENT_GEMMS."""
    bm, bn, bk, warps, stages = cfg
    stages = fit_stages(bm, bn, bk, stages, a.dtype)
    e, k = w.shape[0], a.shape[1]
    if transpose_w:                   # w [E, n, K]: K-major tiles
        n = w.shape[1]
        b_desc, b_rows = _desc(w.view(e * n, k), (bn, bk)), n
    else:                             # w [E, K, n]
        n = w.shape[2]
        b_desc, b_rows = _desc(w.view(e * k, n), (bk, bn)), k
    c = torch.empty(plan.num_rows, n, device=a.device, dtype=a.dtype)
    te, tr = plan.tiles(bm)
    grid, programs = programs_for(te.numel() * triton.cdiv(n, bn), a, name)
    LAUNCHED["row_gemm_tma_persistent" if programs else "row_gemm_tma"] = \
        _row_gemm_tma_kernel[(grid,)](
            _desc(a, (bm, bk)), b_desc, c, plan.slots, te, tr, plan.offsets,
            plan.tile_count(bm), n, k, e, b_rows, B_KMAJOR=transpose_w, SCATTER_C=scatter_c,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PREC=_prec(a), PROGRAMS=programs,
            num_warps=warps, num_stages=stages)
    return c


def programs_for(tiles: int, a: torch.Tensor, name: str | None):
    """(grid, PROGRAMS) of a launch over `tiles` output tiles: (tiles, 0), one program per
    tile, or -- for the GEMMs in triton_experts.PERSISTENT_GEMMS -- one persistent program
    per SM (3 under the interpreter, so that its tests loop)."""
    if name not in fx.PERSISTENT_GEMMS:
        return tiles, 0
    programs = min(tiles, _sm_count(a.device.index) if a.is_cuda else 3)
    return programs, programs


@functools.cache
def _sm_count(device: int | None) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def gate_up(xs, w_gate_up, plan: ExpertPlan, cfg=None):
    """(gu [N, 2I], h [N, I]) from the x rows in expert order xs [N, H]."""
    bm, bn, bk, warps, stages = cfg or CONFIGS["gate_up_tma"]
    stages = fit_stages(bm, bn, bk, stages, xs.dtype, b_tiles=2)
    e, hid, inter, gu, h = gate_up_outputs(xs, w_gate_up, plan)
    te, tr = plan.tiles(bm)
    LAUNCHED["gate_up_tma"] = _gate_up_tma_kernel[(te.numel() * triton.cdiv(inter, bn),)](
        _desc(xs, (bm, bk)), _desc(w_gate_up.view(e * 2 * inter, hid), (bn, bk)), gu, h, te, tr,
        plan.offsets, hid, inter, e, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PREC=_prec(xs),
        num_warps=warps, num_stages=stages)
    return gu, h
