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


def lightning_attn_shared_batched(q, k, v, log_decay, scale, prefix_cu, suffix_cu, parent, prefix_tokens):
    """Packed prompts (prefix_cu, prefix_tokens rows) followed by packed continuations
    (suffix_cu), continuation j carrying on from prompt parent[j]: q/k [N, H, K], v [N, H, V]
    → o [N, H, V] in v's dtype.

    The quadratic form over each continuation's own keys and its prompt's keys (gathered per
    continuation): a continuation token at t after a prompt of L tokens weighs prompt key p by
    λ^(L + t - p), as if the two were one sequence. The same sum as starting from the prompt's
    final state, summed in another order; short prompts never build a [K, V] state per prompt
    nor spread it over the group, and the keys' gradient sums over the group in the gather's."""
    n, out_dtype = prefix_tokens, v.dtype
    (qp, qs), (kp, ks), (vp, vs) = (t.float().split([n, t.shape[0] - n]) for t in (q, k, v))
    g = log_decay.float().to(q.device)
    pre, suf = token_coords(prefix_cu.to(q.device)), token_coords(suffix_cu.to(q.device))
    plen = torch.diff(prefix_cu).long().to(q.device)
    tp = int(plen.max()) if plen.numel() else 0
    Qp, Kp, Vp = (pad_packed(t, pre, plen.numel(), tp) for t in (qp, kp, vp))
    ap = torch.arange(tp, device=q.device, dtype=torch.float32)
    dist = ap[:, None] - ap[None, :]
    decay = torch.exp(g[:, None, None] * dist.clamp(min=0)) * (dist >= 0)          # [H, T, T]
    o = torch.einsum("bhts,bshv->bthv", torch.einsum("bthk,bshk->bhts", Qp, Kp) * decay[None], Vp)[pre]
    if qs.shape[0] > 0:
        nsuf = suffix_cu.numel() - 1
        ts = int(torch.diff(suffix_cu).max())
        Qs, Ks, Vs = (pad_packed(t, suf, nsuf, ts) for t in (qs, ks, vs))
        parent = parent.to(q.device)
        own = torch.arange(ts, device=q.device, dtype=torch.float32)
        to_prompt = plen[parent].float()[:, None, None] + own[None, :, None] - ap[None, None, :]  # L + t - p
        seen = (ap[None, :] < plen[parent].float()[:, None])[:, None, :].expand(-1, ts, -1)
        own_dist = (own[:, None] - own[None, :]).expand(nsuf, -1, -1)
        expo = torch.cat([to_prompt, own_dist], -1)                          # [S, T_own, T_prompt + T_own]
        seen = torch.cat([seen, own_dist >= 0], -1)
        decay = torch.exp(g[None, :, None, None] * expo.clamp(min=0)[:, None]) * seen[:, None]
        keys, values = torch.cat([Kp[parent], Ks], 1), torch.cat([Vp[parent], Vs], 1)
        o_suf = torch.einsum("bhts,bshv->bthv", torch.einsum("bthk,bshk->bhts", Qs, keys) * decay, values)
        o = torch.cat([o, o_suf[suf]])
    return (o * scale).to(out_dtype)
