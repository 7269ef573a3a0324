"""GRPO maths as pure torch functions: group advantages, the clipped policy loss, KL terms.

Shapes: N sequences = groups * group_size, prompt-major (a group's sequences are adjacent);
per-token tensors are [B, T] with a {0,1} (or bool) mask of the response tokens that count.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

# exp() of a log-ratio beyond +-20 overflows nothing in fp32 but is already meaningless; the
# clamp keeps one garbage token (e.g. -inf logprob) from turning the whole loss into inf/nan.
_MAX_LOG_RATIO = 20.0


class GroupAdvantages(NamedTuple):
    advantages: torch.Tensor  # [N] fp32, zero for groups whose rewards are all equal
    equal_groups: torch.Tensor  # [N // group_size] bool: all rewards of the group equal

    @property
    def num_equal_groups(self) -> int:
        return int(self.equal_groups.sum())


def group_advantages(rewards: torch.Tensor, group_size: int, std_norm: bool = True,
                     eps: float = 1e-6) -> GroupAdvantages:
    """A_i = (r_i - mean_g) / (std_g + eps) over each group of group_size adjacent rewards.

    std is the unbiased (n-1) sample std, as in the GRPO paper's code and TRL. A group with
    equal rewards carries no signal: its advantages are exactly 0 and it is flagged, so the
    driver can count it or drop it (trainer.filter_equal_reward_groups).
    """
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2, got {group_size}")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be [N] with N a multiple of group_size={group_size}, got {tuple(rewards.shape)}")
    r = rewards.detach().to(torch.float32).view(-1, group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    equal = (r == r[:, :1]).all(dim=1)
    if std_norm:
        centred = centred / (r.std(dim=1, keepdim=True) + eps)
    centred = torch.where(equal[:, None], torch.zeros_like(centred), centred)
    return GroupAdvantages(centred.view(-1), equal)


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
