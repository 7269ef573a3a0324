"""A batched plain-PyTorch lightning attention for many short packed sequences on CPU.

The reference runs each packed sequence (and each chunk) in a Python loop, which is what
the readable definition should do but is slow for RL batches of dozens of 10-token
sequences. This pads them to [B, T_max] and evaluates the quadratic (decay-masked) form for
all of them in a few batched einsums; autograd gives the backward. Same maths, fp32.
"""
from __future__ import annotations

import torch

from ring_rl.kernels.packing import pad_packed, token_coords

MAX_LEN = 256  # the quadratic form costs T^2 per head: longer sequences take the chunked path


def lightning_attn_batched(q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens,
                           initial_state_index=None):
    """Same contract as `lightning_attn` (q/k [B, T, H, K], v [B, T, H, V], or B = 1 packed
    with cu_seqlens); returns (o in v's dtype, final state fp32 or None)."""
    out_dtype = v.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = q.float(), k.float(), v.float()
    if cu_seqlens is None:
        lens = torch.full((q.shape[0],), q.shape[1], dtype=torch.long, device=q.device)
        qp, kp, vp = q, k, v
        seq = pos = None
    else:
        lens = torch.diff(cu_seqlens).long()
        seq, pos = token_coords(cu_seqlens.to(q.device))
        tmax = int(lens.max()) if lens.numel() else 0
        qp, kp, vp = (pad_packed(x[0], (seq, pos), lens.numel(), tmax) for x in (q, k, v))
    tmax = qp.shape[1]
    g = log_decay.float().to(q.device)
    t = torch.arange(tmax, device=q.device, dtype=torch.float32)
    dist = t[:, None] - t[None, :]                                   # t - s
    decay = torch.exp(g[:, None, None] * dist.clamp(min=0)) * (dist >= 0)  # [H, T, T]
    scores = torch.einsum("bthk,bshk->bhts", qp, kp) * decay[None]
    o = torch.einsum("bhts,bshv->bthv", scores, vp)
    h0 = initial_state.float() if initial_state is not None else None
    if h0 is not None:
        carry = torch.exp(g[None, :] * (t[:, None] + 1))               # λ^(t+1), [T, H]
        if initial_state_index is None:
            o = o + torch.einsum("bthk,bhkv->bthv", qp, h0) * carry[None, :, :, None]
        else:
            o = o + _from_shared_states(qp, h0, initial_state_index.to(q.device)) * carry[None, :, :, None]
            h0 = h0[initial_state_index] if output_final_state else None  # S0 per sequence
    o = o * scale
    final = None
    if output_final_state:
        # S at a sequence's own end L: Σ_{s<L} λ^(L-1-s) k_sᵀ v_s + λ^L S0; padding weighs 0.
        rest = (lens[:, None].float() - 1 - t[None, :])                 # [B, T]
        w = torch.exp(g[None, :, None] * rest.clamp(min=0)[:, None, :]) * (rest >= 0)[:, None, :]
        final = torch.einsum("bhs,bshk,bshv->bhkv", w, kp, vp)
        if h0 is not None:
            final = final + torch.exp(g[None, :] * lens[:, None].float())[..., None, None] * h0
    if seq is not None:
        o = o[seq, pos][None]
    return o.to(out_dtype), final


def _from_shared_states(qp: torch.Tensor, states: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """qp [B, T, H, K] times states[index] [B, H, K, V] without copying a state per
    sequence: the sequences sharing a state are stacked as the rows of one GEMM (a GRPO
    group's responses against their prompt's state), and the state's gradient is that GEMM's,
    not a scatter-add of B copies."""
    b, u = index.numel(), states.shape[0]
    counts = torch.bincount(index, minlength=u)
    order = torch.sort(index, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(b, device=index.device) - (torch.cumsum(counts, 0) - counts)[index[order]]
    grouped = qp.new_zeros((u, int(counts.max()), *qp.shape[1:]))   # [U, G, T, H, K]
    grouped = grouped.index_put((index, rank), qp)
    return torch.einsum("ugthk,uhkv->ugthv", grouped, states)[index, rank]
