"""Plain-PyTorch causal attention over a block-paged KV cache: the definition of the maths.

The Triton kernel in `triton_paged.py` computes the same thing and is tested against this.
"""
from __future__ import annotations

import torch

# Tokens are processed in chunks so the gathered keys stay below this many elements
# (a long prompt would otherwise gather N * L * Hkv * d values at once).
_GATHER_ELEMS = 1 << 24


def check_paged_attention(q, k_cache, v_cache, block_table, seq_idx, positions) -> None:
    """Refuses inconsistent arguments with a ValueError naming the bad one."""
    def bad(name, t, want):
        raise ValueError(f"paged_attention: {name} has shape {tuple(t.shape)} and dtype "
                         f"{t.dtype}; expected {want}")

    if q.dim() != 3 or not q.dtype.is_floating_point:
        bad("q", q, "a floating [N, H, d] tensor")
    n, h, d = q.shape
    if k_cache.dim() != 4 or k_cache.shape[3] != d or k_cache.dtype != q.dtype:
        bad("k_cache", k_cache, f"[num_blocks, block_size, Hkv, {d}] in q's dtype {q.dtype}")
    hkv = k_cache.shape[2]
    if hkv == 0 or h % hkv != 0:
        raise ValueError(f"paged_attention: k_cache has Hkv={hkv} kv heads, which must divide "
                         f"q's H={h} query heads (GQA)")
    if v_cache.shape != k_cache.shape or v_cache.dtype != q.dtype:
        bad("v_cache", v_cache, f"k_cache's shape {tuple(k_cache.shape)} and dtype {q.dtype}")
    if block_table.dim() != 2 or block_table.dtype.is_floating_point or block_table.is_complex():
        bad("block_table", block_table, "an integer [B, max_blocks] tensor")
    for name, t in (("seq_idx", seq_idx), ("positions", positions)):
        if t.shape != (n,) or t.dtype.is_floating_point or t.is_complex():
            bad(name, t, f"an integer [N] tensor with N={n} (q's first dimension)")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("block_table", block_table),
                    ("seq_idx", seq_idx), ("positions", positions)):
        if t.device != q.device:
            raise ValueError(f"paged_attention: {name} is on {t.device}, q on {q.device}")


def paged_attention_ref(q, k_cache, v_cache, block_table, seq_idx, positions, scale):
    """out[t, h] = softmax_j(scale * q[t, h] . K_j) @ V_j over key positions j = 0..positions[t]
    of sequence seq_idx[t], with K_j = k_cache[block_table[b, j // bs], j % bs, h // G]
    (bs = k_cache.shape[1], G = H // Hkv) and likewise V_j.

    Maths in fp32 (fp64 for fp64 inputs); the probabilities are rounded to v's dtype before the
    product with V, as the kernel does for its tensor-core dot, while the normaliser sums them
    unrounded. A token with a negative position is a padding row: it reads nothing, output 0.
    Returns [N, H, d] in q's dtype.
    """
    check_paged_attention(q, k_cache, v_cache, block_table, seq_idx, positions)
    n, h, d = q.shape
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    cdt = torch.promote_types(q.dtype, torch.float32)
    out = torch.zeros(n, hkv, h // hkv, d, dtype=cdt, device=q.device)
    if n == 0 or positions.max() < 0:
        return out.view(n, h, d).to(q.dtype)
    pos, seq, table = positions.long(), seq_idx.long(), block_table.long()
    length = int(pos.max()) + 1
    if length > table.shape[1] * bs:
        raise ValueError(f"paged_attention: positions reach {length - 1}, beyond the "
                         f"{table.shape[1]} x {bs} key slots that block_table addresses")
    j = torch.arange(length, device=q.device)
    chunk = max(1, _GATHER_ELEMS // (length * hkv * d))
    for lo in range(0, n, chunk):
        t = slice(lo, lo + chunk)
        live = j[None, :] <= pos[t, None]                                    # [n, L]
        blocks = torch.where(live, table[seq[t].clamp_min(0)][:, j // bs], 0)
        k = k_cache[blocks, j % bs].to(cdt)                                  # [n, L, Hkv, d]
        v = torch.where(live[..., None, None], v_cache[blocks, j % bs], 0)  # unwritten may be NaN
        qg = q[t].to(cdt).view(-1, hkv, h // hkv, d)
        s = torch.einsum("nkgd,nlkd->nkgl", qg, k) * scale
        s = s.masked_fill(~live[:, None, None, :], float("-inf"))
        m = s.amax(-1, keepdim=True)
        p = torch.exp(s - torch.where(torch.isfinite(m), m, 0))
        l = p.sum(-1, keepdim=True)
        o = torch.einsum("nkgl,nlkd->nkgd", p.to(v.dtype).to(cdt), v.to(cdt))
        out[t] = o / torch.where(l > 0, l, 1)
    return out.view(n, h, d).to(q.dtype)
