"""Lightning attention (linear attention with a fixed per-head decay), Ring-linear's mixer.

    o, final_state = lightning_attn(q, k, v, log_decay, scale=None, initial_state=None,
                                    output_final_state=False, cu_seqlens=None,
                                    initial_state_index=None)
    o = lightning_attn_decode(q, k, v, log_decay, state, state_indices=None, scale=None)
    o = lightning_attn_shared(q, k, v, log_decay, scale, prefix_cu, suffix_cu, parent, lightning=None,
                              prefix_tokens=None, blocks=None)

The maths is defined in `reference.py`. Dispatch (see `ring_rl.kernels.dispatch`): Triton on
CUDA tensors (chunked kernels in `triton_chunk.py` / `triton_chunk_bwd.py`, the one-step kernel
in `triton_decode.py`); on CPU tensors the plain-PyTorch chunked reference, or for batches of
short sequences (<= 256 tokens) its batched equivalent in `torch_batched.py` (RL batches of
many short responses would otherwise loop in Python; `RING_RL_KERNELS=reference` forces the
reference). Both paths give
gradients for q, k, v and initial_state; log_decay is a fixed schedule and gets none.
"""
from __future__ import annotations

import torch

from ring_rl.kernels.dispatch import kernel_mode, use_triton
from ring_rl.kernels.lightning_attn.reference import (
    _check,
    chunk_lightning_attn_ref,
    lightning_attn_decode_ref,
    naive_lightning_attn,
    recurrent_lightning_attn_ref,
)
from ring_rl.kernels.lightning_attn.torch_batched import (
    MAX_LEN,
    lightning_attn_batched,
    lightning_attn_shared_batched,
)
from ring_rl.kernels.prefix_blocks import PrefixBlocks, lightning_blocks

__all__ = [
    "lightning_attn",
    "lightning_attn_decode",
    "lightning_attn_shared",
    "naive_lightning_attn",
    "chunk_lightning_attn_ref",
    "recurrent_lightning_attn_ref",
    "lightning_attn_decode_ref",
]


class LightningAttnFunction(torch.autograd.Function):
    """Triton chunked forward; the backward recomputes the chunk states (saves memory)."""

    @staticmethod
    def forward(ctx, q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens):
        from ring_rl.kernels.lightning_attn import triton_chunk

        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        g = log_decay.detach().to(device=q.device, dtype=torch.float32).contiguous()
        h0 = None if initial_state is None else initial_state.detach().float().contiguous()
        plan = triton_chunk.make_plan(q, v, cu_seqlens)
        o, ht = triton_chunk.chunk_fwd(q, k, v, g, scale, h0, output_final_state, plan)
        ctx.save_for_backward(q, k, v, g, h0)
        ctx.scale, ctx.plan = scale, plan
        ctx.h0_dtype = None if initial_state is None else initial_state.dtype
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        from ring_rl.kernels.lightning_attn import triton_chunk_bwd

        q, k, v, g, h0 = ctx.saved_tensors
        dht = None if dht is None else dht.float().contiguous()
        dq, dk, dv, dh0 = triton_chunk_bwd.chunk_bwd(
            q, k, v, g, ctx.scale, h0, do.contiguous(), dht, ctx.plan
        )
        if dh0 is not None and ctx.h0_dtype is not None:
            dh0 = dh0.to(ctx.h0_dtype)
        return dq, dk, dv, None, None, dh0, None, None


def lightning_attn(q, k, v, log_decay, scale=None, initial_state=None,
                   output_final_state=False, cu_seqlens=None, initial_state_index=None):
    """Chunked lightning attention over whole sequences (prefill and training).

    q, k [B, T, H, K]; v [B, T, H, V]; log_decay [H] fp32, <= 0; initial_state
    [N, H, K, V] fp32 or None. With cu_seqlens (int [N+1] offsets) B is 1 and T packs N
    sequences. initial_state_index (long [N]): sequence i starts from
    initial_state[initial_state_index[i]] instead (states shared by several sequences, e.g.
    a GRPO group's responses continuing their prompt; the gradient sums over the sharers).
    Returns o [B, T, H, V] in v's dtype and the final states [N, H, K, V] fp32 (None unless
    output_final_state).
    """
    n = _check(q, k, v, log_decay, None if initial_state_index is not None else initial_state, cu_seqlens)
    if initial_state_index is not None:
        per_seq = (q.shape[2], q.shape[3], v.shape[3])
        if (initial_state is None or initial_state.dim() != 4 or tuple(initial_state.shape[1:]) != per_seq
                or initial_state_index.shape != (n,)):
            raise ValueError(f"lightning_attn: initial_state_index [N]={n} needs initial_state [U, H, K, V] "
                             f"with (H, K, V)={per_seq}; got index {tuple(initial_state_index.shape)}, state "
                             f"{None if initial_state is None else tuple(initial_state.shape)}")
    batched = (not use_triton(q, k, v) and kernel_mode() == "auto"
               and _longest(q, cu_seqlens) <= MAX_LEN)
    if initial_state_index is not None and not batched:   # the other paths take one state per sequence
        initial_state, initial_state_index = initial_state[initial_state_index], None
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not use_triton(q, k, v):
        if batched:
            # CPU, many short sequences: the batched torch form (same maths, no Python loop).
            return lightning_attn_batched(q, k, v, log_decay, scale, initial_state,
                                          output_final_state, cu_seqlens, initial_state_index)
        return chunk_lightning_attn_ref(q, k, v, log_decay, scale, initial_state,
                                        output_final_state, cu_seqlens)
    return LightningAttnFunction.apply(q, k, v, log_decay, scale, initial_state,
                                       output_final_state, cu_seqlens)


def lightning_attn_shared(q, k, v, log_decay, scale, prefix_cu, suffix_cu, parent, lightning=None,
                          prefix_tokens: int | None = None, blocks: PrefixBlocks | None = None):
    """Prompts shared by groups of continuations, in one flat batch: q, k [N, H, K], v [N, H, V]
    hold the prompts packed by prefix_cu (int [U+1]), then the continuations packed by
    suffix_cu (int [S+1]), continuation j carrying on from prompt parent[j] (long [S]).
    Returns o [N, H, V] in v's dtype: each prompt's outputs, then each continuation's as the
    tail of one sequence with its prompt. On CPU: given `blocks` (the layout of
    `ring_rl.kernels.prefix_blocks.prefix_blocks`, None when a prompt and its continuations do
    not fit in MAX_BLOCK rows), the quadratic form over one masked block per prompt; else with
    short sequences (prompt + continuation <= MAX_LEN) the batched quadratic form over the
    gathered prompt keys (torch_batched.py). Otherwise the prompts' final states carried into
    the continuations (`initial_state_index`) through `lightning` (default `lightning_attn`;
    another one, e.g. an op set's recording wrapper, always takes that path).
    prefix_tokens: prefix_cu[-1] if the caller knows it (no host sync on a GPU)."""
    n = int(prefix_cu[-1]) if prefix_tokens is None else prefix_tokens
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if lightning in (None, lightning_attn) and not use_triton(q, k, v) and kernel_mode() == "auto":
        if blocks is not None:
            return lightning_blocks(q, k, v, log_decay, scale, blocks)
        if _longest(q[None, :n], prefix_cu) + _longest(q[None, n:], suffix_cu) <= MAX_LEN:
            return lightning_attn_shared_batched(q, k, v, log_decay, scale, prefix_cu, suffix_cu, parent, n)
    lightning = lightning or lightning_attn
    (q_pre, q_suf), (k_pre, k_suf), (v_pre, v_suf) = (t.split([n, t.shape[0] - n]) for t in (q, k, v))
    o, final = lightning(q_pre[None], k_pre[None], v_pre[None].contiguous(), log_decay, scale=scale,
                         output_final_state=True, cu_seqlens=prefix_cu)
    if q_suf.shape[0] == 0:
        return o[0]
    o_suf, _ = lightning(q_suf[None], k_suf[None], v_suf[None].contiguous(), log_decay, scale=scale,
                         initial_state=final, initial_state_index=parent, cu_seqlens=suffix_cu)
    return torch.cat([o[0], o_suf[0]])


def _longest(q, cu_seqlens) -> int:
    return q.shape[1] if cu_seqlens is None else int(torch.diff(cu_seqlens).max()) if cu_seqlens.numel() > 1 else 0


def lightning_attn_decode(q, k, v, log_decay, state, state_indices=None, scale=None):
    """One token per sequence: q, k [N, H, K], v [N, H, V]; reads and updates
    state[state_indices[i]] of the fp32 slot cache [slots, H, K, V] in place (slot i when
    state_indices is None; a negative index is a padding row, left alone, output zero).
    Returns o [N, H, V] in v's dtype. Inference only (no autograd)."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not use_triton(q, k, v, state):
        return lightning_attn_decode_ref(q, k, v, log_decay, state, state_indices, scale)
    from ring_rl.kernels.lightning_attn import triton_decode

    return triton_decode.decode_step(q, k, v, log_decay, state, state_indices, scale)
