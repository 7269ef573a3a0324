"""Shared-prompt batches laid out as one block per prompt, for attention in dense GEMMs.

A shared-prompt batch (`ring_rl.model.cache.SharedPrefix`) holds each distinct prompt once,
then the continuations, continuation j carrying on from prompt parent[j]. Attention over it
is a tree: a continuation's token sees its prompt and its own earlier tokens. Here each
prompt and all of its continuations become one block of rows, [prompt | cont a | cont b | ...],
padded to the longest block T, and the tree is a [U, T, T] mask. Attention is then a few
batched GEMMs of [T, K] x [K, T]. The per-continuation form runs hundreds of [3, K] x [K, 11]
ones and their transposes in backward, where the CPU spends its time in call overhead and
layout copies. The prompt's key and value gradients are summed over the group inside the GEMM.
The block form computes the masked pairs between sibling continuations as well, so it is for
short blocks only (`MAX_BLOCK`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ring_rl.kernels.packing import token_coords

MAX_BLOCK = 128  # longest block (prompt + all of its continuations) the block form takes


@dataclass
class PrefixBlocks:
    """Where each packed row sits in the blocks, and what it may attend to.

    Padding positions read packed row 0; every mask keeps them away from the real rows, so
    they add nothing to an output or a gradient, and they only see themselves and the
    prompt's first token (no softmax row is empty)."""

    gather: torch.Tensor   # [U * T] long: the packed row at each block position
    rows: torch.Tensor     # [N] long: each packed row's position in the flattened blocks
    visible: torch.Tensor  # [U, T, T] bool: key position visible from query position
    dist: torch.Tensor     # [U, T, T] fp32: query's token position minus the key's, 0 where hidden
    num_blocks: int
    size: int              # T

    def to_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """Packed [N, H, D] → [H, U, T, D], heads outermost: one gather, and each (head, block)
        a contiguous [T, D] matrix for the batched GEMMs."""
        return x.transpose(0, 1).index_select(1, self.gather).view(x.shape[1], self.num_blocks, self.size, x.shape[2])

    def from_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """[H, U, T, D] → packed [N, H, D]."""
        return x.reshape(x.shape[0], -1, x.shape[-1]).index_select(1, self.rows).transpose(0, 1)


def prefix_blocks(prefix_cu: torch.Tensor, suffix_cu: torch.Tensor, parent: torch.Tensor,
                  max_size: int | None = None) -> PrefixBlocks | None:
    """The block layout of prompts packed by prefix_cu [U+1], then continuations packed by
    suffix_cu [S+1], continuation j after prompt parent[j] (continuations of one prompt keep
    their order within its block); None when a block would be longer than max_size (default
    MAX_BLOCK)."""
    device = prefix_cu.device
    plen, slen = torch.diff(prefix_cu).long(), torch.diff(suffix_cu).long()
    u = plen.numel()
    parent = parent.long().to(device)
    # Each continuation's start within its block: its prompt, then its elder siblings.
    order = torch.sort(parent, stable=True).indices
    ends = torch.cumsum(slen[order], 0)
    group_total = torch.zeros(u, dtype=torch.long, device=device).index_add_(0, parent, slen)
    group_start = torch.cumsum(group_total, 0) - group_total               # [U] in the sorted order
    offset = torch.empty_like(slen)
    offset[order] = ends - slen[order] - group_start[parent[order]] + plen[parent[order]]
    size = int((plen + group_total).max()) if u else 0
    if size > (MAX_BLOCK if max_size is None else max_size):
        return None
    # Block position, token position and owner (-1: the prompt; j: continuation j) of every row.
    p_seq, p_pos = token_coords(prefix_cu)
    s_seq, s_idx = token_coords(suffix_cu)
    s_block = parent[s_seq]
    rows = torch.cat([p_seq * size + p_pos, s_block * size + offset[s_seq] + s_idx])
    gather = torch.zeros(u * size, dtype=torch.long, device=device)
    gather[rows] = torch.arange(rows.numel(), device=device)
    pos = torch.zeros(u * size, device=device)
    pos[rows] = torch.cat([p_pos, plen[s_block] + s_idx]).float()
    owner = -2 - torch.arange(u * size, device=device)                      # padding: its own owner
    owner[rows] = torch.cat([torch.full_like(p_seq, -1), s_seq])
    pos, owner = pos.view(u, size), owner.view(u, size)
    diff = pos[:, :, None] - pos[:, None, :]
    visible = (diff >= 0) & ((owner[:, None, :] == -1) | (owner[:, None, :] == owner[:, :, None]))
    return PrefixBlocks(gather, rows, visible, diff * visible, u, size)


def lightning_blocks(q, k, v, log_decay: torch.Tensor, scale: float, blocks: PrefixBlocks) -> torch.Tensor:
    """Lightning attention over the blocks: q, k [N, H, K], v [N, H, V] → o [N, H, V] in v's
    dtype. A query at token position t weighs a visible key at s by λ^(t - s), the quadratic
    form of the recurrence (what `lightning_attn_shared` computes)."""
    qb, kb, vb = (blocks.to_blocks(x.float()) for x in (q, k, v))
    g = log_decay.float().to(q.device)
    decay = torch.exp(g[:, None, None, None] * blocks.dist) * blocks.visible            # [H, U, T, T]
    o = torch.matmul(torch.matmul(qb, kb.transpose(-1, -2)) * decay, vb)
    return (blocks.from_blocks(o) * scale).to(v.dtype)


def softmax_blocks(q, k, v, blocks: PrefixBlocks) -> torch.Tensor:
    """Causal softmax attention over the blocks (GQA): q [N, H, d], k, v [N, Hkv, d] → [N, H, d]."""
    qb, kb, vb = (blocks.to_blocks(x).transpose(0, 1) for x in (q, k, v))  # [U, H, T, d]
    o = torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, attn_mask=blocks.visible[:, None],
                                                         enable_gqa=True)
    return blocks.from_blocks(o.transpose(0, 1))
