"""What the GRPO update does with the rollout/trainer mismatch (shared/docs/alignment.md).

Per response token, a = rollout logprob, b = trainer logprob (same prefix and weights),
ratio r = π_train_old / π_rollout = exp(b − a). A policy picks the old logprobs the clipped
surrogate is taken against and, optionally, one weight per token that multiplies the token's
loss (`TrainBatch.token_weights`):

| policy    | old logprobs | token weight                                            |
|-----------|--------------|---------------------------------------------------------|
| none      | rollout (a)  | none (plain GRPO; the mismatch is ignored)              |
| recompute | trainer (b)  | none                                                    |
| tis       | trainer (b)  | min(r, C), C = tis_cap                                  |
| mis       | trainer (b)  | 1 if r in [1/C, C] else 0, C = mis_threshold            |
| icepop    | trainer (b)  | 1 if r in [α, β] else 0                                 |

Bounds are inclusive. mis_level=sequence drops whole responses, judged by the sequence's
*geometric-mean* ratio exp(mean_t Δ_t), not the product exp(Σ_t Δ_t): the product grows with
length, so with the same C it would drop every long response for a per-token gap that is
harmless, and a single C could not serve both 10- and 10 000-token responses.

Ratios are computed in fp64 from the inputs' values, so a bf16/fp32 input loses nothing
more here; weights come back as fp32 on the inputs' device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ring_rl.config import AlignmentConfig

# The keys of PolicyResult.metrics, the same for every policy (0 where a policy does not clip
# or mask), so a gate rule or a plot can name them whatever the policy is.
POLICY_METRIC_NAMES = ("policy/masked_frac", "policy/clipped_frac", "policy/weight_mean")


@dataclass
class PolicyResult:
    old_logprobs: list[torch.Tensor]         # per sequence, one per response token
    token_weights: list[torch.Tensor] | None  # fp32, same shapes; None = every weight 1
    metrics: dict[str, float]                # POLICY_METRIC_NAMES


def apply_policy(cfg: AlignmentConfig, rollout_lp: list[torch.Tensor],
                 trainer_lp: list[torch.Tensor]) -> PolicyResult:
    """Old logprobs, token weights and their statistics for one GRPO step's sequences."""
    _check_shapes(rollout_lp, trainer_lp)
    if cfg.policy == "none":
        return PolicyResult(list(rollout_lp), None, _stats(rollout_lp, None))
    if cfg.policy == "recompute":
        return PolicyResult(list(trainer_lp), None, _stats(rollout_lp, None))
    deltas = [t.double() - r.double() for r, t in zip(rollout_lp, trainer_lp)]
    clipped = 0
    if cfg.policy == "tis":
        ratios = [d.exp() for d in deltas]
        weights = [r.clamp(max=cfg.tis_cap) for r in ratios]
        clipped = sum(int((r > cfg.tis_cap).sum()) for r in ratios)
    elif cfg.policy == "mis" and cfg.mis_level == "token":
        weights = [_inside(d.exp(), 1.0 / cfg.mis_threshold, cfg.mis_threshold) for d in deltas]
    elif cfg.policy == "mis":  # sequence level: one decision per response, geometric mean ratio
        weights = []
        for d in deltas:
            geo = math.exp(d.mean().item()) if d.numel() else 1.0  # an empty response drops nothing
            keep = 1.0 / cfg.mis_threshold <= geo <= cfg.mis_threshold
            weights.append(torch.full_like(d, float(keep)))
    elif cfg.policy == "icepop":
        weights = [_inside(d.exp(), cfg.icepop_alpha, cfg.icepop_beta) for d in deltas]
    else:
        raise ValueError(f"alignment.policy: {cfg.policy!r} is not one of none, recompute, tis, mis, icepop")
    weights = [w.float() for w in weights]
    return PolicyResult(list(trainer_lp), weights, _stats(rollout_lp, weights, clipped))


def _inside(ratio: torch.Tensor, low: float, high: float) -> torch.Tensor:
    return ((ratio >= low) & (ratio <= high)).double()


def _stats(rollout_lp: list[torch.Tensor], weights: list[torch.Tensor] | None,
           clipped: int = 0) -> dict[str, float]:
    n = sum(x.numel() for x in rollout_lp)
    if weights is None or n == 0:
        return {"policy/masked_frac": 0.0, "policy/clipped_frac": 0.0, "policy/weight_mean": 1.0}
    w = torch.cat([x.double().cpu() for x in weights])
    return {"policy/masked_frac": (w == 0).sum().item() / n,
            "policy/clipped_frac": clipped / n,
            "policy/weight_mean": w.mean().item()}


def _check_shapes(rollout_lp: list[torch.Tensor], trainer_lp: list[torch.Tensor]) -> None:
    if len(rollout_lp) != len(trainer_lp):
        raise ValueError(f"apply_policy: {len(rollout_lp)} rollout sequences vs {len(trainer_lp)} trainer sequences")
    for i, (r, t) in enumerate(zip(rollout_lp, trainer_lp)):
        if r.shape != t.shape or r.dim() != 1:
            raise ValueError(f"apply_policy: sequence {i}: rollout logprobs {tuple(r.shape)} vs trainer "
                             f"{tuple(t.shape)}; expected two equal 1-D shapes (one per response token)")
