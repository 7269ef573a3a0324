"""Plain-PyTorch lightning attention: the definition every kernel is tested against.

Per head h, with a fixed decay lambda_h = exp(g_h), g_h <= 0 (Ring-linear's ALiBi-like
schedule; the decay does not depend on the data):

    S_t = lambda_h * S_{t-1} + k_t^T v_t          S in R^{K x V}, always fp32
    o_t = scale * q_t S_t                          scale defaults to K ** -0.5

S_{-1} is the initial state (or zero). Equivalently, unrolled:

    o_t = scale * ( sum_{s <= t} lambda^(t-s) (q_t . k_s) v_s  +  lambda^(t+1) q_t S_{-1} )

Shapes: q, k [B, T, H, K]; v [B, T, H, V]; log_decay [H] (= g); states [N, H, K, V] fp32.
With `cu_seqlens` (int tensor [N+1] of offsets) B must be 1 and the T axis packs N
sequences; each starts from its own initial state and never sees another's tokens.

Every function computes in fp32 (fp64 for fp64 inputs) and returns o in v's dtype.
Exponents of the decay are always >= 0 distances, so `exp(g * n)` never overflows, even for g = -8.
"""
from __future__ import annotations

import torch


def _check(q, k, v, log_decay, initial_state, cu_seqlens):
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"lightning_attn: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must be "
            "[B, T, H, K], [B, T, H, K], [B, T, H, V]"
        )
    B, T, H, K = q.shape
    V = v.shape[-1]
    if log_decay.shape != (H,):
        raise ValueError(f"lightning_attn: log_decay {tuple(log_decay.shape)} must be [H]={H}")
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"lightning_attn: cu_seqlens needs B == 1 (packed), got B={B}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError("lightning_attn: cu_seqlens must be a 1-D tensor of N+1 offsets")
        if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != T:
            raise ValueError(f"lightning_attn: cu_seqlens must run from 0 to T={T}")
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is not None and initial_state.shape != (N, H, K, V):
        raise ValueError(
            f"lightning_attn: initial_state {tuple(initial_state.shape)} must be [N, H, K, V]="
            f"{(N, H, K, V)}"
        )
    return N


def _per_sequence(fn, q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens):
    """Run `fn(q, k, v, g, scale, h0)` on each sequence ([T, H, *] fp32 tensors, h0 [H, K, V]
    or None) and reassemble o [B, T, H, V] (v's dtype) and the final states [N, H, K, V]."""
    N = _check(q, k, v, log_decay, initial_state, cu_seqlens)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    # fp32 maths; fp64 inputs stay fp64 (the tests' high-precision ground truth).
    ct = torch.promote_types(q.dtype, torch.float32)
    g = log_decay.to(ct)
    if cu_seqlens is None:
        pieces = [(b, slice(None)) for b in range(q.shape[0])]
    else:
        bounds = cu_seqlens.tolist()
        pieces = [(0, slice(bounds[n], bounds[n + 1])) for n in range(N)]
    outs, finals = [], []
    for n, (b, span) in enumerate(pieces):
        h0 = None if initial_state is None else initial_state[n].to(ct)
        o, ht = fn(q[b, span].to(ct), k[b, span].to(ct), v[b, span].to(ct), g, scale, h0)
        outs.append(o)
        finals.append(ht)
    o = torch.stack(outs) if cu_seqlens is None else torch.cat(outs)[None]
    final = torch.stack(finals) if output_final_state else None
    return o.to(v.dtype), final


def _zeros_state(k, v, h0):
    T, H, K = k.shape
    return h0 if h0 is not None else k.new_zeros(H, K, v.shape[-1])


def _naive_one(q, k, v, g, scale, h0):
    T = q.shape[0]
    t = torch.arange(T, device=q.device)
    dist = (t[:, None] - t[None, :]).clamp(min=0).float()  # t - s where s <= t
    decay = torch.exp(g[:, None, None] * dist) * (t[:, None] >= t[None, :])  # [H, T, T]
    scores = torch.einsum("thk,shk->hts", q, k) * decay
    o = torch.einsum("hts,shv->thv", scores, v)
    h0 = _zeros_state(k, v, h0)
    q_decay = torch.exp(g[None, :] * (t[:, None] + 1).float())  # lambda^(t+1), [T, H]
    o = o + torch.einsum("thk,hkv->thv", q * q_decay[..., None], h0)
    k_decay = torch.exp(g[None, :] * (T - 1 - t[:, None]).float())  # lambda^(T-1-s)
    ht = torch.exp(g * T)[:, None, None] * h0 \
        + torch.einsum("thk,thv->hkv", k * k_decay[..., None], v)
    return scale * o, ht


def _chunk_one(q, k, v, g, scale, h0, chunk_size):
    T = q.shape[0]
    S = _zeros_state(k, v, h0)
    outs = []
    for start in range(0, T, chunk_size):
        qc, kc, vc = (x[start:start + chunk_size].transpose(0, 1) for x in (q, k, v))  # [H, c, *]
        c = qc.shape[1]
        pos = torch.arange(c, device=q.device)
        dist = (pos[:, None] - pos[None, :]).clamp(min=0).float()
        decay = torch.exp(g[:, None, None] * dist) * (pos[:, None] >= pos[None, :])
        intra = ((qc @ kc.transpose(1, 2)) * decay) @ vc  # inside the chunk
        q_decay = torch.exp(g[:, None] * (pos + 1).float())[..., None]  # lambda^(i+1)
        inter = (qc * q_decay) @ S  # everything before the chunk, through its entering state
        outs.append((intra + inter).transpose(0, 1))
        k_decay = torch.exp(g[:, None] * (c - 1 - pos).float())[..., None]  # lambda^(c-1-j)
        S = torch.exp(g * c)[:, None, None] * S + (kc * k_decay).transpose(1, 2) @ vc
    o = torch.cat(outs) if outs else v.new_zeros(0, *v.shape[1:])
    return scale * o, S


def _recurrent_one(q, k, v, g, scale, h0):
    S = _zeros_state(k, v, h0)
    lam = torch.exp(g)[:, None, None]
    outs = []
    for t in range(q.shape[0]):
        S = lam * S + k[t][:, :, None] * v[t][:, None, :]
        outs.append(scale * torch.einsum("hk,hkv->hv", q[t], S))
    o = torch.stack(outs) if outs else v.new_zeros(0, *v.shape[1:])
    return o, S


def naive_lightning_attn(q, k, v, log_decay, scale=None, initial_state=None,
                         output_final_state=False, cu_seqlens=None):
    """Quadratic form: the decay-masked attention matrix, materialised. Returns (o, final)."""
    return _per_sequence(_naive_one, q, k, v, log_decay, scale, initial_state,
                         output_final_state, cu_seqlens)


def chunk_lightning_attn_ref(q, k, v, log_decay, scale=None, initial_state=None,
                             output_final_state=False, cu_seqlens=None, chunk_size=64):
    """Chunked parallel form: decay-masked attention inside each chunk of `chunk_size`
    tokens plus the state entering the chunk. Differentiable; the CPU path of the op."""
    def one(q, k, v, g, scale, h0):
        return _chunk_one(q, k, v, g, scale, h0, chunk_size)
    return _per_sequence(one, q, k, v, log_decay, scale, initial_state,
                         output_final_state, cu_seqlens)


def recurrent_lightning_attn_ref(q, k, v, log_decay, scale=None, initial_state=None,
                                 output_final_state=False, cu_seqlens=None):
    """Token-by-token form: the recurrence exactly as written above."""
    return _per_sequence(_recurrent_one, q, k, v, log_decay, scale, initial_state,
                         output_final_state, cu_seqlens)


def lightning_attn_decode_ref(q, k, v, log_decay, state, state_indices=None, scale=None):
    """One recurrent step per sequence, updating the slot cache in place.

    q, k [N, H, K]; v [N, H, V]; state [num_slots, H, K, V] fp32; row i uses and updates
    state[state_indices[i]] (slot i when state_indices is None). A negative index marks a
    padding row: its slot is untouched and its output is zero. Returns o [N, H, V] in v's dtype.
    """
    N, H, K = q.shape
    if k.shape != q.shape or v.shape[:2] != (N, H) or state.shape[1:] != (H, K, v.shape[-1]):
        raise ValueError(
            f"lightning_attn_decode: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
            f"state {tuple(state.shape)} must be [N, H, K], [N, H, K], [N, H, V], [slots, H, K, V]"
        )
    if state.dtype != torch.float32:
        raise ValueError(f"lightning_attn_decode: state must be fp32, got {state.dtype}")
    scale = K ** -0.5 if scale is None else scale
    if state_indices is None:
        state_indices = torch.arange(N, device=state.device)
    state_indices = state_indices.to(device=state.device, dtype=torch.long)
    decay = torch.exp(log_decay.float())[None, :, None, None]
    n_slots = state.shape[0]
    if N <= n_slots and torch.equal(state_indices, torch.arange(N, device=state.device)):
        # Rows 0..N-1 own slots 0..N-1 (a decode batch before any sequence finished):
        # update the cache in place, no gather/scatter copies. Same arithmetic as below.
        return _decode_step(state[:N], q, k, v, decay, scale).to(v.dtype)
    live = state_indices >= 0
    slots = state_indices[live]
    S = state.index_select(0, slots)
    o = v.new_zeros(N, H, v.shape[-1], dtype=torch.float32)
    o[live] = _decode_step(S, q[live], k[live], v[live], decay, scale)
    state.index_copy_(0, slots, S)
    return o.to(v.dtype)


def _decode_step(S, q, k, v, decay, scale):
    """S <- decay * S + k^T v in place (S [n, H, K, V] fp32, contiguous), then o = scale * q S.
    Batched GEMMs: the outer product is never materialised as its own [n, H, K, V] tensor.
    On CPU the three passes over the state run block by block (<= 1 MB of state each), so each
    block is read from memory once and stays in cache for the other two (~20% faster at 256
    rows of the tiny model; the same operations per element, so the same bits)."""
    n, H, K, V = S.shape
    rows = n if S.is_cuda else max(1, (1 << 20) // (H * K * V * 4))
    q, k, v = q.float(), k.float(), v.float()
    outs = []
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        block = S[lo:hi]
        flat = block.view((hi - lo) * H, K, V)
        block.mul_(decay)
        flat.baddbmm_(k[lo:hi].reshape(-1, K, 1), v[lo:hi].reshape(-1, 1, V))
        outs.append(torch.bmm(q[lo:hi].reshape(-1, 1, K), flat))
    o = outs[0] if len(outs) == 1 else torch.cat(outs)
    return scale * o.view(n, H, V)
