"""Batch-invariant causal attention over a block-paged KV cache (forward only), for exact mode.

    out = paged_attention(q, k_cache, v_cache, block_table, seq_idx, positions, scale)

q [N, H, d]; k_cache, v_cache viewed as [num_blocks, block_size, Hkv, d] with any strides (the
vLLM FlashAttention cache as is; the trainer's [slots, Hkv, capacity, d] cache passed as
`k.transpose(1, 2)` with block_table = slot ids [B, 1]); block_table int [B, max_blocks];
seq_idx, positions int [N]. Token t attends to key positions 0..positions[t] (inclusive) of
sequence seq_idx[t], whose K/V the caller has already written; logical key j lives at block
block_table[b, j // block_size], row j % block_size. GQA: query head h reads kv head
h // (H // Hkv). Returns [N, H, d] in q's dtype. The maths is defined in `reference.py`.

Why the result is bitwise independent of batching (prefill, chunked prefill, decode, other
sequences in the batch, page layout): each (token, kv head) is one Triton program that sees
only its own q and the K/V values at logical positions 0..pos, visited in tiles of the fixed
BLOCK_N starting at 0, with the same padded tile shapes and the same fp32 online softmax.
Nothing it computes depends on N, the batch, the block size or where the pages lie: the block
table only changes which address a value is loaded from, not the order of arithmetic. The
launch configuration is constant (no autotuning), so the same compiled code runs each time.
The reference (used on CPU tensors) is exact maths, not bitwise equal to the kernel.

Dispatch (see `ring_rl.kernels.dispatch`): Triton on CUDA tensors or with
RING_RL_KERNELS=triton, else the reference.
"""
from __future__ import annotations

import torch

from ring_rl.kernels.attention.reference import (
    check_paged_attention,
    paged_attention_ref,
)
from ring_rl.kernels.dispatch import use_triton

__all__ = ["paged_attention", "paged_attention_ref"]

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def paged_attention(q, k_cache, v_cache, block_table, seq_idx, positions, scale):
    """Causal attention of N query tokens over a paged KV cache; see the module docstring.

    A token with a negative position is a padding row (output 0, nothing read). Positions
    must lie inside what block_table addresses and their K/V must be written: the kernel
    does not check (that would need a device sync) and reads whatever the cache holds.
    """
    check_paged_attention(q, k_cache, v_cache, block_table, seq_idx, positions)
    if not use_triton(q, k_cache, v_cache):
        return paged_attention_ref(q, k_cache, v_cache, block_table, seq_idx, positions, scale)
    if q.dtype not in _TRITON_DTYPES:
        raise ValueError(f"paged_attention: q dtype {q.dtype} not supported by the Triton "
                         "kernel (float16, bfloat16 or float32)")
    from ring_rl.kernels.attention import triton_paged

    return triton_paged.paged_attention_fwd(q, k_cache, v_cache, block_table, seq_idx,
                                            positions, scale)
