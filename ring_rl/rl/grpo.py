"""GRPO maths: group-normalised advantages. The policy loss itself lives with the trainer
(`ring_rl.trainer.loss`) and is re-exported here.

Shapes: N sequences = groups * group_size, prompt-major (a group's sequences are adjacent);
per-token tensors are [B, T] with a {0,1} (or bool) mask of the response tokens that count.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ring_rl.trainer.loss import kl_penalty, masked_aggregate, policy_loss  # noqa: F401  (re-export)


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
