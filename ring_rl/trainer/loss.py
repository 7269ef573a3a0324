"""The GRPO policy loss and KL terms the trainer optimises (pure torch, no engine code).

Per-token tensors are [B, T] with a {0,1} (or bool) mask of the response tokens that count.
"""

from __future__ import annotations

from typing import Literal

import torch

# exp() of a log-ratio beyond +-20 overflows nothing in fp32 but is already meaningless; the
# clamp keeps one garbage token (e.g. -inf logprob) from turning the whole loss into inf/nan.
_MAX_LOG_RATIO = 20.0


def masked_aggregate(values: torch.Tensor, mask: torch.Tensor,
                     agg: Literal["token", "sequence"] = "token") -> torch.Tensor:
    """token: sum over all masked tokens / their count. sequence: mean over sequences (with
    at least one token) of each sequence's token mean, so long responses weigh no more."""
    m = mask.to(values.dtype)
    if agg == "token":
        return (values * m).sum() / m.sum().clamp(min=1.0)
    if agg == "sequence":
        lengths = m.sum(dim=1)
        per_seq = (values * m).sum(dim=1) / lengths.clamp(min=1.0)
        has_tokens = (lengths > 0).to(values.dtype)
        return (per_seq * has_tokens).sum() / has_tokens.sum().clamp(min=1.0)
    raise ValueError(f"agg must be 'token' or 'sequence', got {agg!r}")


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip_low: float, clip_high: float,
                agg: Literal["token", "sequence"] = "token",
                token_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate with separate bounds: per token -min(r A, clip(r, 1-cl, 1+ch) A).

    logp [B, T] carries the gradient; old_logp [B, T] (the old policy: rollout or trainer
    recompute) and advantages [B] are constants. token_weights [B, T] (TIS weights, MIS/IcePop
    0/1 masks) multiply each token's loss but do not change the denominator: masking a token
    through the weights keeps the other tokens' scale; to drop it from the count, clear it in
    `mask` instead. Stats are detached 0-dim tensors (no host sync here).
    """
    if logp.shape != old_logp.shape or logp.shape != mask.shape or advantages.shape != logp.shape[:1]:
        raise ValueError(f"shapes: logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)}, "
                         f"mask {tuple(mask.shape)}, advantages {tuple(advantages.shape)}")
    valid = mask.bool()
    # Padding positions may hold garbage logprobs; keep them out of exp() entirely.
    log_ratio = torch.where(valid, logp - old_logp.detach(), torch.zeros_like(logp))
    log_ratio = log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    adv = advantages.detach().to(ratio.dtype)[:, None]
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    if token_weights is not None:
        per_token = per_token * token_weights.detach().to(per_token.dtype)
    loss = masked_aggregate(per_token, valid, agg)

    with torch.no_grad():
        # The clipped branch is the active one (zero gradient) exactly in these two cases.
        low = (ratio < 1.0 - clip_low) & (adv < 0)
        high = (ratio > 1.0 + clip_high) & (adv > 0)
        r_valid = ratio[valid]
        stats = {
            "clip_frac_low": masked_aggregate(low.float(), valid),
            "clip_frac_high": masked_aggregate(high.float(), valid),
            "approx_kl_k3": masked_aggregate(ratio - 1.0 - log_ratio, valid),  # KL(old || new)
            "ratio_mean": masked_aggregate(ratio, valid),
            "ratio_max": r_valid.max() if r_valid.numel() else ratio.new_tensor(1.0),
            "ratio_min": r_valid.min() if r_valid.numel() else ratio.new_tensor(1.0),
        }
    return loss, {k: v.detach() for k, v in stats.items()}


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
               kind: Literal["k1", "k2", "k3"] = "k3") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) on tokens sampled from the policy.

    k1 = logp - ref, k2 = (logp - ref)^2 / 2, k3 = e^(ref-logp) - 1 - (ref - logp) (>= 0,
    low variance; the GRPO paper's choice). Returns [B, T], zero outside the mask; aggregate
    it with masked_aggregate using the loss's agg.
    """
    valid = mask.bool()
    d = torch.where(valid, ref_logp.detach() - logp, torch.zeros_like(logp))
    d = d.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    if kind == "k1":
        out = -d
    elif kind == "k2":
        out = 0.5 * d * d
    elif kind == "k3":
        out = torch.exp(d) - 1.0 - d
    else:
        raise ValueError(f"kind must be 'k1', 'k2' or 'k3', got {kind!r}")
    return torch.where(valid, out, torch.zeros_like(out))
