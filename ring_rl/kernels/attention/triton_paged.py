"""Triton batch-invariant causal attention over a block-paged KV cache (forward only).

One program per (query token, kv head): it holds the G query heads sharing that kv head as a
[G_PAD, D_PAD] tile and walks logical key positions 0, BLOCK_N, 2*BLOCK_N, ... up to its own
position, gathering each key's physical row through the block table, with an fp32 online
softmax. The order and shape of every floating-point operation is therefore fixed by the
token's position alone (see the package docstring for why that gives batch invariance).

The launch configuration is module constants plus the head shape (G, d) and the dtype: never
N, the batch, the block size or the number of blocks. No autotuning -- an autotuner could
pick different tiles for different batches, which is exactly what must not happen.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 64     # keys per tile: the fixed reduction order over key positions
MIN_DOT = 16     # tl.dot needs >= 16 rows and a reduction dim >= 16: G and d are padded
NUM_WARPS = 4
NUM_STAGES = 2
# Pinned rather than left to TRITON_DEFAULT_FP_FUSION (whose default flips in Triton 3.10):
# mul+add -> FMA contraction changes roundings, so both engines must compile it the same way.
FP_FUSION = True


@triton.jit
def _paged_attn_fwd(q_ptr, k_ptr, v_ptr, bt_ptr, seq_ptr, pos_ptr, o_ptr, scale, block_size,
                    s_qn, s_qh, s_qd, s_kb, s_kr, s_kh, s_kd, s_vb, s_vr, s_vh, s_vd,
                    s_bt, s_on, s_oh,
                    G: tl.constexpr, D: tl.constexpr, G_PAD: tl.constexpr,
                    D_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1).to(tl.int64)
    pos = tl.load(pos_ptr + tok).to(tl.int32)
    seq = tl.load(seq_ptr + tok).to(tl.int64)
    rg, rd, rn = tl.arange(0, G_PAD), tl.arange(0, D_PAD), tl.arange(0, BLOCK_N)
    d_in = rd < D
    heads = kvh * G + rg                                       # int64: caches can be large
    q_mask = (rg < G)[:, None] & d_in[None, :]
    q = tl.load(q_ptr + tok * s_qn + heads[:, None] * s_qh + rd[None, :] * s_qd,
                mask=q_mask, other=0.0)
    m = tl.full([G_PAD], float("-inf"), tl.float32)
    l = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    bt_row = bt_ptr + seq * s_bt
    k_base, v_base = k_ptr + kvh * s_kh, v_ptr + kvh * s_vh
    # A negative position (padding row) runs no iteration and reads no key.
    for start in range(0, pos + 1, BLOCK_N):
        j = start + rn
        live = j <= pos
        blk = tl.load(bt_row + j // block_size, mask=live, other=0).to(tl.int64)
        row = (j % block_size).to(tl.int64)
        kv_mask = live[:, None] & d_in[None, :]
        k = tl.load(k_base + blk[:, None] * s_kb + row[:, None] * s_kr + rd[None, :] * s_kd,
                    mask=kv_mask, other=0.0)
        # "ieee": fp32 inputs must never go through TF32 (ignored for 16-bit inputs).
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        s = tl.where(live[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))   # finite: key `start` <= pos is live
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(v_base + blk[:, None] * s_vb + row[:, None] * s_vr + rd[None, :] * s_vd,
                    mask=kv_mask, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
        m = m_new
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(o_ptr + tok * s_on + heads[:, None] * s_oh + rd[None, :],
             out.to(o_ptr.dtype.element_ty), mask=q_mask)


def paged_attention_fwd(q, k_cache, v_cache, block_table, seq_idx, positions, scale):
    """Launcher; arguments already checked by `paged_attention`. Returns [N, H, d]."""
    n, h, d = q.shape
    hkv = k_cache.shape[2]
    g = h // hkv
    out = torch.empty(n, h, d, dtype=q.dtype, device=q.device)
    if n == 0:
        return out
    table = block_table if block_table.stride(1) == 1 else block_table.contiguous()
    seq_idx, positions = seq_idx.contiguous(), positions.contiguous()
    _paged_attn_fwd[(n, hkv)](
        q, k_cache, v_cache, table, seq_idx, positions, out, float(scale), k_cache.shape[1],
        *q.stride(), *k_cache.stride(), *v_cache.stride(), table.stride(0),
        out.stride(0), out.stride(1),
        G=g, D=d, G_PAD=max(MIN_DOT, triton.next_power_of_2(g)),
        D_PAD=max(MIN_DOT, triton.next_power_of_2(d)), BLOCK_N=BLOCK_N,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES, enable_fp_fusion=FP_FUSION,
    )
    return out
