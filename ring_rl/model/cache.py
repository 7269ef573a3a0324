"""Inference state for batched incremental decoding: one slot per sequence.

Softmax layers keep K/V per slot ([slots, kv_heads, capacity, head_dim], model dtype,
grown on demand); lightning layers keep the recurrent state per slot
([slots, heads, d, d], fp32). `lengths[slot]` counts the tokens a slot has seen, so
sequences of different lengths decode side by side.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ring_rl.kernels.packing import token_coords
from ring_rl.kernels.prefix_blocks import PrefixBlocks, prefix_blocks
from ring_rl.model.config import RingLinearConfig


class RingCache:
    is_compileable = False  # read by transformers' generate()

    def __init__(
        self,
        config: RingLinearConfig,
        num_slots: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        capacity: int = 64,
        state_dtype: torch.dtype = torch.float32,
    ):
        self.config = config
        self.num_slots = num_slots
        self.dtype = dtype
        self.device = torch.device(device)
        self.lengths = torch.zeros(num_slots, dtype=torch.long, device=self.device)
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.state: dict[int, torch.Tensor] = {}
        d_lin = config.linear_head_dim
        for i in range(config.num_hidden_layers):
            if config.is_softmax_layer(i):
                shape = (num_slots, config.num_key_value_heads, capacity, config.head_dim)
                self.kv[i] = (torch.zeros(shape, dtype=dtype, device=self.device),
                              torch.zeros(shape, dtype=dtype, device=self.device))
            else:
                shape = (num_slots, config.num_attention_heads, d_lin, d_lin)
                self.state[i] = torch.zeros(shape, dtype=state_dtype, device=self.device)

    @property
    def capacity(self) -> int:
        return next(iter(self.kv.values()))[0].shape[2] if self.kv else 0

    def reserve(self, total_len: int) -> None:
        """Grow every KV buffer (doubling) so `total_len` tokens fit in a slot."""
        cap = self.capacity
        if not self.kv or total_len <= cap:
            return
        new_cap = max(total_len, 2 * cap)
        for i, (k, v) in self.kv.items():
            grown = []
            for t in (k, v):
                g = t.new_zeros(t.shape[0], t.shape[1], new_cap, t.shape[3])
                g[:, :, :cap] = t
                grown.append(g)
            self.kv[i] = (grown[0], grown[1])

    def copy_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Slots `dst` continue from what slots `src` hold (e.g. a prompt prefilled once)."""
        used = int(self.lengths[src].max()) if src.numel() else 0  # positions the sources hold
        self.lengths[dst] = self.lengths[src]
        for s in self.state.values():
            s.index_copy_(0, dst, s.index_select(0, src))
        if self.kv:  # the KV capacity past `used` holds nothing yet: not copied
            for k, v in self.kv.values():
                for t in (k, v):
                    t[:, :, :used].index_copy_(0, dst, t[:, :, :used].index_select(0, src))

    def fan_out(self, group: int, n: int) -> None:
        """Slots g*group+1 .. g*group+group-1 continue from slot g*group, for the first n slots
        (a GRPO batch: each prompt prefilled once at its group's first row). `copy_slots` for
        that layout, as one broadcast copy per buffer: no gathered temporary, half the traffic."""
        if group <= 1:
            return
        m = n // group
        self.lengths[:n].view(m, group)[:, 1:] = self.lengths[:n].view(m, group)[:, :1]
        for s in self.state.values():
            grouped = s[:n].view(m, group, *s.shape[1:])
            grouped[:, 1:] = grouped[:, :1]
        used = int(self.lengths[:n].max()) if n else 0
        for k, v in self.kv.values():
            for t in (k, v):
                grouped = t[:n, :, :used].unflatten(0, (m, group))
                grouped[:, 1:] = grouped[:, :1]

    def reset(self, slots: torch.Tensor | None = None) -> None:
        """Free slots for new sequences (all slots when `slots` is None)."""
        idx = slice(None) if slots is None else slots
        self.lengths[idx] = 0
        for s in self.state.values():
            s[idx] = 0

    # transformers' generate() asks this of any cache it is handed.
    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return int(self.lengths.max()) if self.num_slots else 0


@dataclass
class SharedPrefix:
    """A flat batch of sequences that share prompts (a GRPO group), each distinct prompt once:
    rows [0, prefix_tokens) are the prompts packed by `prefix_cu`, the rest are the
    continuations packed by `suffix_cu`, continuation j carrying on from prompt `parent[j]`.

    The attention layers run a continuation as the tail of one sequence with its prompt (the
    lightning recurrence starts from the prompt's final state, softmax queries also see the
    prompt's keys), so each prompt's forward and backward is computed once per group, not once
    per sample, and its gradient is the sum of what every continuation sends back."""

    prefix_cu: torch.Tensor   # [U+1] int32
    suffix_cu: torch.Tensor   # [S+1] int32
    parent: torch.Tensor      # [S] long: the prompt each continuation extends
    prefix_tokens: int
    prefix_max: int
    suffix_max: int

    @functools.cached_property
    def blocks(self) -> PrefixBlocks | None:
        """One block of rows per prompt and its continuations (`ring_rl.kernels.prefix_blocks`),
        built once for all layers; None when a block would be longer than its MAX_BLOCK."""
        return prefix_blocks(self.prefix_cu, self.suffix_cu, self.parent)


@dataclass
class SeqBatch:
    """Metadata of one forward over flattened tokens (what every layer sees).

    cu_seqlens [B+1] offsets of each sequence's new tokens; positions [N] absolute token
    positions; with a cache, slots [B] maps each sequence to its cache slot and
    past_lens [B] is how many tokens each slot held before this forward."""

    cu_seqlens: torch.Tensor
    positions: torch.Tensor
    max_new: int
    cache: RingCache | None = None
    slots: torch.Tensor | None = None
    past_lens: torch.Tensor | None = None
    shared: SharedPrefix | None = None

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def is_decode(self) -> bool:
        """Every sequence adds exactly one token to a cache (the recurrent-step path)."""
        return self.cache is not None and self.max_new == 1 and self.positions.numel() == self.num_seqs

    def token_coords(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sequence index, index within the new tokens) of every flattened token."""
        return token_coords(self.cu_seqlens)

    @staticmethod
    def build(seqlens: torch.Tensor, cache: RingCache | None = None, slots: torch.Tensor | None = None) -> "SeqBatch":
        device = seqlens.device
        cu = torch.zeros(seqlens.numel() + 1, dtype=torch.int32, device=device)
        cu[1:] = torch.cumsum(seqlens, 0)
        past = None
        if cache is not None:
            if slots is None:
                slots = torch.arange(seqlens.numel(), device=device)
            past = cache.lengths[slots].to(device)
        starts = past if past is not None else torch.zeros_like(seqlens)
        seq_of_token, offset = token_coords(cu)
        positions = offset + starts[seq_of_token]
        max_new = int(seqlens.max()) if seqlens.numel() else 0
        return SeqBatch(cu, positions, max_new, cache, slots, past)

    @staticmethod
    def build_shared(prompt_lens: torch.Tensor, suffix_lens: torch.Tensor, parent: torch.Tensor) -> SeqBatch:
        """The uncached batch of a `SharedPrefix` layout: prompts [U] of prompt_lens tokens,
        then continuations [S] of suffix_lens (>= 1) tokens, continuation j after prompt
        parent[j]. Per-token ops see U + S sequences; positions run on across the seam."""
        pre, suf = SeqBatch.build(prompt_lens), SeqBatch.build(suffix_lens)
        seq, _ = suf.token_coords()
        positions = torch.cat([pre.positions, suf.positions + prompt_lens[parent][seq]])
        cu = torch.cat([pre.cu_seqlens, suf.cu_seqlens[1:] + pre.cu_seqlens[-1]])
        shared = SharedPrefix(pre.cu_seqlens, suf.cu_seqlens, parent.long(), int(pre.cu_seqlens[-1]),
                              pre.max_new, suf.max_new)
        return SeqBatch(cu, positions, max(pre.max_new, suf.max_new), shared=shared)
