"""The two token mixers of Ring-linear: lightning (linear) attention and GQA softmax attention.

Both take flattened tokens x [N, hidden] with a `SeqBatch`; neither knows which engine
runs it. Parameter names are the checkpoint's (`attention.query_key_value`, ...).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ring_rl import kernels
from ring_rl.kernels.packing import pad_packed, token_coords
from ring_rl.kernels.prefix_blocks import softmax_blocks
from ring_rl.model.cache import SeqBatch, SharedPrefix
from ring_rl.model.config import RingLinearConfig
from ring_rl.model.ops import ModelOps


class KeepFP32Buffers(nn.Module):
    """Buffers named in `_fp32_buffers` follow the module's device but never its dtype:
    `model.to(bfloat16)` must not round the decay schedule or the expert bias."""

    _fp32_buffers: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        saved = {name: getattr(self, name) for name in self._fp32_buffers}
        super()._apply(fn, recurse)
        for name, before in saved.items():
            after = getattr(self, name)
            if not before.is_meta and not after.is_meta:
                setattr(self, name, before.to(device=after.device, dtype=torch.float32))
        return self


class RMSNorm(nn.Module):
    """Weight holder; the maths is `ops.rms_norm` (fp32 inside, cast back once)."""

    def __init__(self, dim: int, eps: float, ops: ModelOps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return self.ops.rms_norm(x, self.weight, self.eps)
        return self.ops.rms_norm(x, self.weight, self.eps, residual=residual)


class LightningAttention(KeepFP32Buffers):
    """Linear attention with per-head exponential decay, qk-norm, partial RoPE and an
    output gate `GroupRMSNorm(o) * sigmoid(g_proj(x))`. MHA: K/V heads = Q heads."""

    _fp32_buffers = ("log_decay",)

    def __init__(self, config: RingLinearConfig, layer_idx: int, ops: ModelOps):
        super().__init__()
        self.layer_idx, self.ops = layer_idx, ops
        self.num_heads = config.num_attention_heads
        self.head_dim = config.linear_head_dim
        width = self.num_heads * self.head_dim
        self.rotary_dim = int(self.head_dim * config.partial_rotary_factor)
        self.rope_theta = config.rope_theta
        self.linear_silu = config.linear_silu
        self.group_norm_size = config.group_norm_size
        self.eps = config.rms_norm_eps
        self.query_key_value = nn.Linear(config.hidden_size, 3 * width, bias=False)
        self.g_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.dense = nn.Linear(width, config.hidden_size, bias=False)
        self.g_norm = RMSNorm(width, config.rms_norm_eps, ops)
        self.use_qk_norm = config.use_qk_norm
        if self.use_qk_norm:
            self.query_layernorm = RMSNorm(self.head_dim, config.rms_norm_eps, ops)
            self.key_layernorm = RMSNorm(self.head_dim, config.rms_norm_eps, ops)
        decay = ops.log_decay(layer_idx, config.num_hidden_layers, self.num_heads)
        self.register_buffer("log_decay", decay, persistent=False)

    def forward(self, x: torch.Tensor, batch: SeqBatch) -> torch.Tensor:
        n, h, d = x.shape[0], self.num_heads, self.head_dim
        qkv = self.ops.linear(x, self.query_key_value.weight).float()  # the recurrence runs in fp32
        if self.linear_silu:
            qkv = F.silu(qkv)
        q, k, v = qkv.view(n, 3, h, d).unbind(1)
        if self.use_qk_norm:
            q, k = self.query_layernorm(q), self.key_layernorm(k)
        q = self.ops.rotary(q, batch.positions, self.rotary_dim, self.rope_theta)
        k = self.ops.rotary(k, batch.positions, self.rotary_dim, self.rope_theta)
        scale = d ** -0.5
        decay = self.log_decay.to(q.device)
        cache = batch.cache
        if batch.shared is not None:
            o = _shared_lightning(self.ops, q, k, v, decay, scale, batch.shared)
        elif cache is None:
            o, _ = self.ops.lightning_attn(q[None], k[None], v[None].contiguous(), decay, scale=scale,
                                           cu_seqlens=batch.cu_seqlens)
            o = o[0]
        elif batch.is_decode:
            o = self.ops.lightning_attn_decode(q, k, v.contiguous(), decay, cache.state[self.layer_idx],
                                               state_indices=batch.slots, scale=scale)
        else:
            states = cache.state[self.layer_idx]
            init = states[batch.slots].float()
            o, final = self.ops.lightning_attn(q[None], k[None], v[None].contiguous(), decay, scale=scale,
                                               initial_state=init, output_final_state=True,
                                               cu_seqlens=batch.cu_seqlens)
            states[batch.slots] = final.to(states.dtype)
            o = o[0]
        gate = self.ops.linear(x, self.g_proj.weight)
        o = self.ops.group_norm_gate(o.reshape(n, h * d), gate, self.g_norm.weight, self.group_norm_size, self.eps)
        return self.ops.linear(o.to(x.dtype), self.dense.weight)


class SoftmaxAttention(nn.Module):
    """Causal GQA attention with qk-norm and partial RoPE; KV cached per slot."""

    def __init__(self, config: RingLinearConfig, layer_idx: int, ops: ModelOps):
        super().__init__()
        self.layer_idx, self.ops = layer_idx, ops
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.rotary_dim = int(self.head_dim * config.partial_rotary_factor)
        self.rope_theta = config.rope_theta
        qkv_width = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, qkv_width, bias=False)
        self.dense = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.use_qk_norm = config.use_qk_norm
        if self.use_qk_norm:
            self.query_layernorm = RMSNorm(self.head_dim, config.rms_norm_eps, ops)
            self.key_layernorm = RMSNorm(self.head_dim, config.rms_norm_eps, ops)

    def forward(self, x: torch.Tensor, batch: SeqBatch) -> torch.Tensor:
        n, d, dtype = x.shape[0], self.head_dim, x.dtype
        q, k, v = self.ops.linear(x, self.query_key_value.weight).split(
            [self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d], dim=-1)
        q, k = q.reshape(n, self.num_heads, d).float(), k.reshape(n, self.num_kv_heads, d).float()
        v = v.reshape(n, self.num_kv_heads, d)
        if self.use_qk_norm:
            q, k = self.query_layernorm(q), self.key_layernorm(k)
        q = self.ops.rotary(q, batch.positions, self.rotary_dim, self.rope_theta).to(dtype)
        k = self.ops.rotary(k, batch.positions, self.rotary_dim, self.rope_theta).to(dtype)
        if batch.shared is not None:
            out = _shared_prefix_attention(q, k, v, batch.shared)
        elif batch.cache is None:
            out = _varlen_attention(q, k, v, batch.cu_seqlens, batch.max_new)
        elif self.ops.paged_attention is not None:
            out = _paged_cache_attention(self.ops.paged_attention, q, k, v, batch, self.layer_idx)
        elif batch.is_decode:
            out = _decode_attention(q, k, v, batch, self.layer_idx)
        else:
            out = _cached_prefill_attention(q, k, v, batch, self.layer_idx)
        return self.ops.linear(out.reshape(n, self.num_heads * d), self.dense.weight)


def _varlen_attention(q, k, v, cu_seqlens: torch.Tensor, tmax: int) -> torch.Tensor:
    """Causal attention of packed sequences in one call: pad to [B, T_max], mask keys that
    lie ahead or beyond a sequence's end, unpad. q [N, H, d], k/v [N, Hkv, d]."""
    lens = torch.diff(cu_seqlens).to(q.device)
    coords, nseq = token_coords(cu_seqlens), lens.numel()
    ar = torch.arange(tmax, device=q.device)
    allowed = (ar[None, :] <= ar[:, None])[None] & (ar[None, None, :] < lens[:, None, None])
    o = F.scaled_dot_product_attention(*(pad_packed(t, coords, nseq, tmax).transpose(1, 2) for t in (q, k, v)),
                                       attn_mask=allowed[:, None], enable_gqa=True)
    return o.transpose(1, 2)[coords]


def _shared_prefix_attention(q, k, v, sp: SharedPrefix) -> torch.Tensor:
    """Causal attention over a SharedPrefix layout: the prompts among themselves, then each
    continuation over [its prompt's keys | its own keys so far]. The prompt's keys are
    gathered per continuation, so their gradient sums over the group. On CPU, while each
    prompt and its continuations fit in one block (`SharedPrefix.blocks`), the same attention
    runs as one masked block per prompt."""
    if not q.is_cuda and sp.blocks is not None:  # CPU, short groups: one masked block per prompt
        return softmax_blocks(q, k, v, sp.blocks)
    n = sp.prefix_tokens
    out = _varlen_attention(q[:n], k[:n], v[:n], sp.prefix_cu, sp.prefix_max)
    if q.shape[0] == n:
        return out
    pmax, smax, nsuf = sp.prefix_max, sp.suffix_max, sp.parent.numel()
    pre, suf = token_coords(sp.prefix_cu), token_coords(sp.suffix_cu)
    keys, values = ([pad_packed(t[:n], pre, sp.prefix_cu.numel() - 1, pmax)[sp.parent], pad_packed(t[n:], suf, nsuf, smax)]
                    for t in (k, v))
    keys, values = torch.cat(keys, 1).transpose(1, 2), torch.cat(values, 1).transpose(1, 2)
    prompt_len = torch.diff(sp.prefix_cu).to(q.device)[sp.parent]
    own_len = torch.diff(sp.suffix_cu).to(q.device)
    ap, asuf = torch.arange(pmax, device=q.device), torch.arange(smax, device=q.device)
    see_prompt = (ap[None, :] < prompt_len[:, None])[:, None, :].expand(-1, smax, -1)
    see_own = (asuf[None, :] <= asuf[:, None])[None] & (asuf[None, None, :] < own_len[:, None, None])
    allowed = torch.cat([see_prompt, see_own], -1)  # [S, T_own, T_prompt + T_own]; key 0 always seen
    o = F.scaled_dot_product_attention(pad_packed(q[n:], suf, nsuf, smax).transpose(1, 2), keys, values,
                                       attn_mask=allowed[:, None], enable_gqa=True)
    return torch.cat([out, o.transpose(1, 2)[suf]])


def _shared_lightning(ops: ModelOps, q, k, v, decay, scale: float, sp: SharedPrefix) -> torch.Tensor:
    """Lightning attention over a SharedPrefix layout: the prompts first, then each
    continuation as the tail of one sequence with its prompt (the prompt's gradient sums
    over the group). `lightning_attn_shared`, through the op set's lightning_attn."""
    blocks = sp.blocks if not q.is_cuda else None
    return kernels.lightning_attn_shared(q, k, v, decay, scale, sp.prefix_cu, sp.suffix_cu, sp.parent,
                                         lightning=ops.lightning_attn, prefix_tokens=sp.prefix_tokens, blocks=blocks)


def _decode_attention(q, k, v, batch: SeqBatch, layer_idx: int) -> torch.Tensor:
    """One new token per sequence: append it to each slot's KV, attend over the slot."""
    cache, slots, past = batch.cache, batch.slots, batch.past_lens
    cache.reserve(int(past.max()) + 1)
    k_cache, v_cache = cache.kv[layer_idx]
    k_cache[slots, :, past] = k
    v_cache[slots, :, past] = v
    length = int(past.max()) + 1
    n = slots.numel()
    if not slots.is_cuda and n <= k_cache.shape[0] and torch.equal(slots, torch.arange(n)):
        keys, values = k_cache[:n, :, :length], v_cache[:n, :, :length]  # rows own slots 0..n-1: views
    else:
        keys, values = k_cache[slots, :, :length], v_cache[slots, :, :length]
    allowed = torch.arange(length, device=q.device)[None, :] <= past[:, None]  # [B, L]
    o = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=allowed[:, None, None],
                                       enable_gqa=True)
    return o[:, :, 0]


def _paged_cache_attention(paged_attention, q, k, v, batch: SeqBatch, layer_idx: int) -> torch.Tensor:
    """New tokens into the slot cache, then the batch-invariant kernel over it (exact mode on
    a GPU): each token attends to positions 0..its own, read in the kernel's fixed order, so
    prefill, chunked prefill and decode give it the same bits, as they do inside vLLM."""
    cache = batch.cache
    seq, offset = batch.token_coords()
    pos = batch.past_lens[seq] + offset
    cache.reserve(int(pos.max()) + 1)
    k_cache, v_cache = cache.kv[layer_idx]
    slot = batch.slots[seq]
    k_cache[slot, :, pos] = k
    v_cache[slot, :, pos] = v
    table = batch.slots.to(torch.int32)[:, None]  # one "block" per slot: [slots, capacity, Hkv, d]
    return paged_attention(q, k_cache.transpose(1, 2), v_cache.transpose(1, 2), table, seq, pos,
                           q.shape[-1] ** -0.5)


def _cached_prefill_attention(q, k, v, batch: SeqBatch, layer_idx: int) -> torch.Tensor:
    """Several new tokens per sequence into the cache. A fresh prefill (nothing cached yet)
    is the uncached packed form plus one scatter into the slots; on top of cached tokens
    (chunked prefill) it runs per sequence."""
    cache = batch.cache
    cache.reserve(int((batch.past_lens + torch.diff(batch.cu_seqlens).long()).max()))
    k_cache, v_cache = cache.kv[layer_idx]
    if not bool(batch.past_lens.any()):
        seq, pos = batch.token_coords()
        slot = batch.slots[seq]
        k_cache[slot, :, pos] = k
        v_cache[slot, :, pos] = v
        return _varlen_attention(q, k, v, batch.cu_seqlens, batch.max_new)
    out = torch.empty_like(q)
    cu = batch.cu_seqlens.tolist()
    for b in range(len(cu) - 1):
        s, e = cu[b], cu[b + 1]
        if e == s:
            continue
        slot, past = int(batch.slots[b]), int(batch.past_lens[b])
        k_cache[slot, :, past:past + e - s] = k[s:e].transpose(0, 1)
        v_cache[slot, :, past:past + e - s] = v[s:e].transpose(0, 1)
        kb, vb = k_cache[slot, :, :past + e - s], v_cache[slot, :, :past + e - s]
        out[s:e] = _causal_attention(q[s:e].transpose(0, 1), kb, vb, past).transpose(0, 1)
    return out


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int) -> torch.Tensor:
    """q [H, n, d] at positions past..past+n-1 over k/v [Hkv, past+n, d]."""
    n = q.shape[1]
    if past == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    if n == 1:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    # SDPA's is_causal aligns top-left; queries here sit at the end of the key range.
    allowed = torch.arange(past + n, device=q.device)[None, :] <= (past + torch.arange(n, device=q.device))[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
