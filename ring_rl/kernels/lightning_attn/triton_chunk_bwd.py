"""Backward of the chunked lightning attention, built from the forward's kernels.

With D_t = dL/dS_t (S_t the state after token t) and E = dL/dS leaving a chunk:

    D_t  = scale * q_t^T do_t + lambda * D_{t+1}        (D_{T-1} also gets d final_state)
    dq_i = scale * ( sum_{j<=i} lambda^(i-j) (do_i . v_j) k_j + lambda^(i+1) do_i S_enter^T )
    dk_j = scale * sum_{i>=j} lambda^(i-j) (v_j . do_i) q_i + lambda^(n-1-j) v_j E^T
    dv_j = scale * sum_{i>=j} lambda^(i-j) (k_j . q_i) do_i + lambda^(n-1-j) k_j E
    d initial_state = lambda * D_0

So dq is the forward with (q, k, v, S) -> (do, v, k, S^T); dk and dv are the same output
kernel run backwards in time with (v, do, q, E^T) and (k, q, do, E) -- or `_dkdv_kernel`,
which does both in one walk and reads q, k, v, do once instead of twice. The E states come
from the state kernels run in reverse over (q, do). The forward states are recomputed (one
pass) rather than saved, so training keeps no [chunks, H, K, V] tensor alive.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ring_rl.kernels.lightning_attn.triton_chunk import _prec, config, run_output, run_states


@triton.jit
def _dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, g_ptr, es_ptr, seg_ptr, dk_ptr, dv_ptr,
                 chunks_ptr, scale, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                 BK: tl.constexpr, BV: tl.constexpr, SUB: tl.constexpr, PREC: tl.constexpr):
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    start = tl.load(chunks_ptr + 5 * i_t).to(tl.int64)
    end = tl.load(chunks_ptr + 5 * i_t + 1).to(tl.int64)
    i_seg = tl.load(chunks_ptr + 5 * i_t + 2).to(tl.int64)
    gap = tl.load(chunks_ptr + 5 * i_t + 4)  # tokens from the chunk's end to the segment's
    g = tl.load(g_ptr + i_h)
    rk, rv, pos = tl.arange(0, BK), tl.arange(0, BV), tl.arange(0, SUB)
    k_in, v_in = rk < K, rv < V
    tile = rk[:, None] * V + rv[None, :]
    tile_mask = k_in[:, None] & v_in[None, :]
    e = tl.load(es_ptr + (i_t * H + i_h) * K * V + tile, mask=tile_mask, other=0.0)
    boundary = tl.load(seg_ptr + (i_seg * H + i_h) * K * V + tile, mask=tile_mask, other=0.0)
    e = e.to(tl.float32) + tl.exp(g * gap.to(tl.float32)) * boundary  # dL/dS leaving the chunk
    anti = pos[:, None] <= pos[None, :]  # row j (the key's token) sees columns i >= j
    dist = tl.maximum(pos[None, :] - pos[:, None], 0).to(tl.float32)
    decay = tl.where(anti, tl.exp(g * dist), 0.0)
    nsub = tl.cdiv(end - start, SUB)
    for it in range(0, nsub):
        s0 = start + (nsub - 1 - it) * SUB
        n = tl.minimum(end - s0, SUB)
        live = pos < n
        tok = (s0 + pos) * H + i_h
        mk, mv = live[:, None] & k_in[None, :], live[:, None] & v_in[None, :]
        q = tl.load(q_ptr + tok[:, None] * K + rk[None, :], mask=mk, other=0.0)
        k = tl.load(k_ptr + tok[:, None] * K + rk[None, :], mask=mk, other=0.0)
        v = tl.load(v_ptr + tok[:, None] * V + rv[None, :], mask=mv, other=0.0)
        do = tl.load(do_ptr + tok[:, None] * V + rv[None, :], mask=mv, other=0.0)
        w_in = tl.where(live, tl.exp(g * tl.maximum(n - 1 - pos, 0).to(tl.float32)), 0.0)
        e_lo = e.to(k.dtype)
        s_kq = (tl.dot(k, tl.trans(q), input_precision=PREC) * decay).to(k.dtype)
        dv = scale * tl.dot(s_kq, do, input_precision=PREC)
        dv += tl.dot((k * w_in[:, None]).to(k.dtype), e_lo, input_precision=PREC)
        tl.store(dv_ptr + tok[:, None] * V + rv[None, :], dv.to(dv_ptr.dtype.element_ty), mask=mv)
        s_vdo = (tl.dot(v, tl.trans(do), input_precision=PREC) * decay).to(k.dtype)
        dk = scale * tl.dot(s_vdo, q, input_precision=PREC)
        dk += tl.dot((v * w_in[:, None]).to(k.dtype), tl.trans(e_lo), input_precision=PREC)
        tl.store(dk_ptr + tok[:, None] * K + rk[None, :], dk.to(dk_ptr.dtype.element_ty), mask=mk)
        w_up = tl.where(live, tl.exp(g * (pos + 1).to(tl.float32)), 0.0)
        qw = (q * w_up[:, None]).to(k.dtype)
        e = e * tl.exp(g * n.to(tl.float32)) \
            + scale * tl.dot(tl.trans(qw), do, input_precision=PREC)


def _dkdv(q, k, v, do, g, scale, es, plan):
    H, K, V = q.shape[-2], q.shape[-1], v.shape[-1]
    cfg = config(q.dtype)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    if plan.n_chunks:
        _dkdv_kernel[(plan.n_chunks, H)](
            q, k, v, do, g, es[0], es[1], dk, dv, plan.chunks, float(scale),
            H=H, K=K, V=V, BK=triton.next_power_of_2(K), BV=triton.next_power_of_2(V),
            SUB=cfg["sub"], PREC=_prec(q), num_warps=cfg["dkdv_warps"],
            num_stages=cfg["dkdv_stages"],
        )
    return dk, dv


def chunk_bwd(q, k, v, g, scale, h0, do, dht, plan):
    """Returns dq, dk, dv (inputs' dtype) and d initial_state (fp32, None without h0)."""
    do = do.to(q.dtype)
    hs, _ = run_states(k, v, g, h0, plan, False, 1.0, False)
    es, dh0 = run_states(q, do, g, dht, plan, True, scale, h0 is not None)
    dq = run_output(do, v, k, g, hs, plan, False, scale, scale, 1.0, True)
    if config(q.dtype)["fuse_dkdv"]:
        dk, dv = _dkdv(q, k, v, do, g, scale, es, plan)
    else:
        dk = run_output(v, do, q, g, es, plan, True, scale, 1.0, scale, True)
        dv = run_output(k, q, do, g, es, plan, True, scale, 1.0, scale, False)
    return dq, dk, dv, dh0
