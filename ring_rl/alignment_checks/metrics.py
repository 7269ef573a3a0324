"""Rollout-vs-trainer logprob mismatch metrics (definitions: shared/docs/alignment.md).

a_t: the rollout engine's logprob of a sampled token; b_t: the trainer's, same prefix and
weights; response tokens only. Δ_t = b_t − a_t, r_t = exp(Δ_t)."""
from __future__ import annotations

import torch


def logprob_mismatch(rollout_lp: list[torch.Tensor], trainer_lp: list[torch.Tensor]) -> dict[str, float]:
    # One cast of the joined values (exact: fp32/bf16 -> fp64), not one per sequence.
    a = torch.cat(rollout_lp).double() if rollout_lp else torch.zeros(0, dtype=torch.float64)
    b = torch.cat(trainer_lp).double() if trainer_lp else torch.zeros(0, dtype=torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"logprob_mismatch: {a.numel()} rollout tokens vs {b.numel()} trainer tokens")
    if a.numel() == 0:
        return {"align/tokens": 0}
    delta = b - a
    abs_d = delta.abs()
    ratio = delta.exp()
    q = torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64)
    p50, p90, p99 = torch.quantile(abs_d, q).tolist()
    r1, r50, r99 = torch.quantile(ratio, torch.tensor([0.01, 0.5, 0.99], dtype=torch.float64)).tolist()
    # per-sequence sums of Δ in one pass (a batch holds hundreds of short sequences)
    lens = torch.tensor([x.numel() for x in rollout_lp])
    seq = torch.zeros(len(rollout_lp), dtype=torch.float64).index_add_(
        0, torch.repeat_interleave(torch.arange(len(rollout_lp)), lens), delta)
    bitwise = int((a.float() == b.float()).sum())   # the fp32 values, as both engines gave them
    return {
        "align/tokens": a.numel(),
        "align/delta_mean": delta.mean().item(),
        "align/abs_delta_mean": abs_d.mean().item(),
        "align/abs_delta_p50": p50,
        "align/abs_delta_p90": p90,
        "align/abs_delta_p99": p99,
        "align/abs_delta_max": abs_d.max().item(),
        "align/ratio_p1": r1,
        "align/ratio_p50": r50,
        "align/ratio_p99": r99,
        "align/ratio_min": ratio.min().item(),
        "align/ratio_max": ratio.max().item(),
        "align/k1": (a - b).mean().item(),
        "align/k2": (0.5 * delta ** 2).mean().item(),
        "align/k3": (ratio - 1 - delta).mean().item(),
        "align/bitwise_equal_frac": bitwise / a.numel(),
        "align/seq_abs_mismatch_max": seq.abs().max().item(),
    }


def router_flip_rate(rollout_ids: torch.Tensor, trainer_ids: torch.Tensor) -> torch.Tensor:
    """Per MoE layer, the share of tokens whose top-k expert *set* differs.

    Both [layers, tokens, k] (any expert order)."""
    a = rollout_ids.long().sort(dim=-1).values
    b = trainer_ids.long().sort(dim=-1).values
    return (a != b).any(dim=-1).double().mean(dim=-1)
