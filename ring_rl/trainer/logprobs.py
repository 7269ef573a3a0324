"""Packing sequences into one flattened batch and reading per-target-token logprobs back.

A sequence s (prompt + response, or an SFT example) with a target mask m feeds s[:-1] to the
model: the logits at input position j predict token s[j+1], so token t is scored by the row
t - 1. The last token is never fed (nothing reads what it would predict), which makes the
input exactly the P + R - 1 positions whose experts the rollout recorded.

Sequences are packed back to back with cu_seqlens (no padding); only the rows that predict a
target token go through the lm_head (see `FlatPolicy`), so prompt positions cost no [V] row.
`pack_shared` packs prompt + response sequences with each distinct prompt once (a GRPO group
shares one): the prompt's rows are computed, and back-propagated, once per group.
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch
from torch import nn

from ring_rl.kernels.packing import token_coords
from ring_rl.model.cache import SeqBatch
from ring_rl.model.modeling import RingLinearForCausalLM
from ring_rl.model.sampling import entropy_from_logits, token_logprobs
from ring_rl.types import SamplingParams


def logprob_temperature(sampling: SamplingParams) -> float:
    """The temperature rollout logprobs were taken at (greedy rollouts report T = 1)."""
    return sampling.temperature if sampling.temperature > 0 else 1.0


@dataclass
class PackedBatch:
    input_ids: torch.Tensor                       # [N] the sequences minus their last token
    seqlens: torch.Tensor                         # [B] input length of each packed sequence
    rows: torch.Tensor                            # [M] input rows whose logits predict a target
    targets: torch.Tensor                         # [M] the target tokens, sequence by sequence
    num_targets: list[int]                        # targets per sequence (splits [M])
    replay_ids: dict[int, torch.Tensor] | None    # MoE layer -> experts [N, top_k] to replay
    batch: SeqBatch | None = None                 # the layout when not plain packing (pack_shared)
    token_rows: torch.Tensor | None = None        # pack_shared: each sequence's input positions'
                                                  # rows, back to back in `seqlens` order

    def split(self, values: torch.Tensor) -> list[torch.Tensor]:
        """[M] per-target values → one tensor per packed sequence."""
        return list(torch.split(values, self.num_targets))

    def padded(self, values: torch.Tensor, fill: float | bool = 0) -> torch.Tensor:
        """[M] per-target values → [B, max targets] (row b: sequence b's values, then `fill`).
        One scatter, one autograd node: `pad_sequence(split(values))` made 2B of each."""
        seq, pos = self._target_coords
        out = values.new_full((len(self.num_targets), max(self.num_targets, default=0)), fill)
        return out.index_put((seq, pos), values)

    @functools.cached_property
    def _target_coords(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sequence, position) of each target: the targets are packed sequence after sequence."""
        cu = torch.tensor([0, *itertools.accumulate(self.num_targets)], device=self.targets.device)
        return token_coords(cu)

    def per_sequence_rows(self, router_ids: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """The model's per-row router ids in plain packed order (sequence after sequence,
        `seqlens` long each), whatever the layout it ran."""
        if self.token_rows is None:
            return router_ids
        return {layer: ids[self.token_rows] for layer, ids in router_ids.items()}


def pack(sequences: list[torch.Tensor], target_masks: list[torch.Tensor], device: torch.device | str,
         replay: list[torch.Tensor] | None = None, moe_layers: list[int] | None = None) -> PackedBatch:
    """sequences[i] [L_i] token ids (L_i >= 2), target_masks[i] [L_i] bool (position 0 is never a
    target). replay[i] [num_moe_layers, L_i - 1, top_k]: experts to force, layers in the order
    of `moe_layers` (sorted MoE layer indices)."""
    ids, seqlens, rows, targets, counts = [], [], [], [], []
    offset = 0
    for i, (seq, mask) in enumerate(zip(sequences, target_masks)):
        if seq.numel() < 2 or seq.shape != mask.shape:
            raise ValueError(f"sequence {i}: need >= 2 tokens and a mask of the same length, "
                             f"got {tuple(seq.shape)} tokens and mask {tuple(mask.shape)}")
        mask = mask.bool()
        if mask[0]:
            raise ValueError(f"sequence {i}: its first token cannot be a target (nothing predicts it)")
        pos = torch.nonzero(mask[1:]).squeeze(-1)  # input rows whose next token is a target
        ids.append(seq[:-1])
        seqlens.append(seq.numel() - 1)
        rows.append(pos + offset)
        targets.append(seq[1:][pos])
        counts.append(pos.numel())
        offset += seq.numel() - 1
    replay_ids = None
    if replay is not None:
        stacked = _stack_replay(replay, seqlens, moe_layers).to(device)
        replay_ids = {layer: stacked[j] for j, layer in enumerate(moe_layers)}
    return PackedBatch(
        input_ids=torch.cat(ids).to(device=device, dtype=torch.long),
        seqlens=torch.tensor(seqlens, dtype=torch.long, device=device),
        rows=torch.cat(rows).to(device),
        targets=torch.cat(targets).to(device=device, dtype=torch.long),
        num_targets=counts,
        replay_ids=replay_ids,
    )


def _stack_replay(replay: list[torch.Tensor], seqlens: list[int], moe_layers: list[int]) -> torch.Tensor:
    """Per-sequence experts [num_moe_layers, L_i, k] → [num_moe_layers, sum L_i, k] long."""
    for i, (r, n) in enumerate(zip(replay, seqlens)):
        if r is None or r.dim() != 3 or r.shape[0] != len(moe_layers) or r.shape[1] != n:
            shape = None if r is None else tuple(r.shape)
            raise ValueError(f"router_ids[{i}]: expected [{len(moe_layers)}, {n}, top_k] "
                             f"(MoE layers x input positions), got {shape}")
    return torch.cat(replay, dim=1).long()


def pack_shared(prompts: list[torch.Tensor], responses: list[torch.Tensor], device: torch.device | str,
                replay: list[torch.Tensor] | None = None, moe_layers: list[int] | None = None) -> PackedBatch:
    """`pack(*response_sequences(prompts, responses))` with each distinct prompt laid out once
    (`SharedPrefix`): the same logprobs, targets and router ids, in the same order, from
    fewer rows. The row predicting a response's first token is its prompt's last row, shared
    by the group; the continuation (response minus its last token) follows the prompts.
    Responses must be non-empty; replay as in `pack` ([num_moe_layers, P_i + R_i - 1, top_k])."""
    index: dict[tuple, int] = {}   # prompt tokens -> its number among the distinct prompts
    uniq, parent_of = [], []       # each distinct prompt's first sequence; each sequence's prompt
    for i, (p, r) in enumerate(zip(prompts, responses)):
        if p.numel() < 1 or r.numel() < 1:
            raise ValueError(f"sequence {i}: pack_shared needs a prompt and a response of >= 1 token, "
                             f"got {p.numel()} and {r.numel()}")
        key = tuple(p.tolist())
        if key not in index:
            index[key] = len(uniq)
            uniq.append(i)
        parent_of.append(index[key])
    plens = [prompts[i].numel() for i in uniq]
    pstart = [0, *itertools.accumulate(plens)][:-1]  # each prompt's first row
    row = sum(plens)
    ids = [prompts[i].long() for i in uniq]
    # Row lists as Python ints (one tensor each at the end: per-sequence torch ops cost more
    # than the maths for a batch of hundreds of short sequences).
    seqlens, rows, counts, token_rows, suffix_lens, parent = [], [], [], [], [], []
    orig = 0  # offset of sequence i's inputs in plain packed order
    orig_start, suffix_source = [], []   # inputs' positions in plain packed order
    for i, (p, r) in enumerate(zip(prompts, responses)):
        u, plen, rlen = parent_of[i], p.numel(), r.numel()
        orig_start.append(orig)
        if rlen > 1:
            ids.append(r[:-1].long())
            suffix_lens.append(rlen - 1)
            parent.append(u)
            suffix_source.extend(range(orig + plen, orig + plen + rlen - 1))
        rows.append(pstart[u] + plen - 1)              # the prompt's last row predicts r[0]
        rows.extend(range(row, row + rlen - 1))
        counts.append(rlen)
        token_rows.extend(range(pstart[u], pstart[u] + plen))
        token_rows.extend(range(row, row + rlen - 1))
        seqlens.append(plen + rlen - 1)
        row += rlen - 1
        orig += plen + rlen - 1
    source = [orig_start[i] + j for u, i in enumerate(uniq) for j in range(plens[u])] + suffix_source
    targets = torch.cat([r.long() for r in responses])
    replay_ids = None
    if replay is not None:
        stacked = _stack_replay(replay, seqlens, moe_layers)[:, torch.tensor(source)].to(device)
        replay_ids = {layer: stacked[j] for j, layer in enumerate(moe_layers)}
    batch = SeqBatch.build_shared(torch.tensor(plens, device=device), torch.tensor(suffix_lens, dtype=torch.long,
                                  device=device), torch.tensor(parent, dtype=torch.long, device=device))
    return PackedBatch(
        input_ids=torch.cat(ids).to(device=device),
        seqlens=torch.tensor(seqlens, dtype=torch.long, device=device),
        rows=torch.tensor(rows, dtype=torch.long, device=device),
        targets=targets.to(device),
        num_targets=counts,
        replay_ids=replay_ids,
        batch=batch,
        token_rows=torch.tensor(token_rows, dtype=torch.long, device=device),
    )


def pack_rollout(rollout, idx: list[int], device, moe_layers: list[int], share_prompts: bool,
                 replay: bool) -> PackedBatch:
    """Sequences `idx` of a RolloutBatch (non-empty responses) for the trainer: each distinct
    prompt once when share_prompts, else every sequence whole; replay forces the rollout's
    recorded experts."""
    def sub(xs):
        return [xs[i] for i in idx]
    routes = sub(rollout.router_ids) if replay else None
    if share_prompts:
        return pack_shared(sub(rollout.prompt_ids), sub(rollout.response_ids), device, routes, moe_layers)
    seqs, masks = response_sequences(sub(rollout.prompt_ids), sub(rollout.response_ids))
    return pack(seqs, masks, device, routes, moe_layers)


def response_sequences(prompts: list[torch.Tensor], responses: list[torch.Tensor]):
    """prompt + response ids and their target masks (the response tokens)."""
    seqs = [torch.cat([p.long(), r.long()]) for p, r in zip(prompts, responses)]
    masks = [torch.cat([torch.zeros(len(p), dtype=torch.bool), torch.ones(len(r), dtype=torch.bool)])
             for p, r in zip(prompts, responses)]
    return seqs, masks


class FlatPolicy(nn.Module):
    """The module DeepSpeed wraps: the model's flat forward, with the lm_head applied only
    to `rows`.

    It is RingLinearForCausalLM.forward_flat (same decoder, same `ops.lm_logits`) minus the
    logits nobody reads: an [N, V] fp32 tensor would be the largest of the step. Going
    through this module's __call__ also lets ZeRO-3 gather parameters with its hooks."""

    def __init__(self, model: RingLinearForCausalLM):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, seqlens: torch.Tensor, rows: torch.Tensor,
                replay_ids: dict[int, torch.Tensor] | None = None, batch: SeqBatch | None = None):
        """→ (fp32 logits [M, V] of the selected rows, router ids {moe_layer: [N, top_k]}).
        batch: a prepared layout (`pack_shared`); default the plain packing of seqlens."""
        batch = SeqBatch.build(seqlens) if batch is None else batch
        out = self.model.model.forward_flat(input_ids, batch, replay_ids)
        logits = self.model.ops.lm_logits(out.hidden[rows], self.model.lm_head.weight)
        return logits, out.router_ids


def score(module: nn.Module, packed: PackedBatch, temperature: float, with_entropy: bool = True):
    """Forward one packed batch → (fp32 logprobs [M], entropy [M] or None, router ids in
    plain packed order).

    Entropy never carries a gradient (it is a metric here)."""
    logits, router_ids = module(packed.input_ids, packed.seqlens, packed.rows, packed.replay_ids, batch=packed.batch)
    router_ids = packed.per_sequence_rows(router_ids)
    logp = token_logprobs(logits, packed.targets, temperature)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = entropy_from_logits(logits.detach(), temperature)
    return logp, entropy, router_ids


def stack_router_ids(router_ids: dict[int, torch.Tensor], seqlens: list[int]) -> list[torch.Tensor]:
    """{moe_layer: [N, k]} → per sequence [num_moe_layers, L_i, k] int16 (the RolloutBatch
    layout, layers sorted), so router flips compare position by position."""
    if not router_ids:
        return [None] * len(seqlens)
    stacked = torch.stack([router_ids[layer] for layer in sorted(router_ids)]).to(torch.int16).cpu()
    return list(torch.split(stacked, seqlens, dim=1))


def micro_batches(indices: list[int], size: int) -> list[list[int]]:
    return [indices[i:i + size] for i in range(0, len(indices), size)]
