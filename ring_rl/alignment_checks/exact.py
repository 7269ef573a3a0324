"""Exact mode's promise, checked: every response token's logprob bitwise equal between the
rollout and the trainer, and every recorded expert the same. The first broken place is
named so a run that claims exact mode and is not stops with evidence."""
from __future__ import annotations

import torch


def first_exact_difference(rollout_lp: list[torch.Tensor], trainer_lp: list[torch.Tensor],
                           rollout_ids: list[torch.Tensor] | None, trainer_ids: list,
                           moe_layers: list[int]) -> str | None:
    """None when bitwise equal everywhere; else where it first breaks (sequence, token, layer)."""
    for i, (a, b) in enumerate(zip(rollout_lp, trainer_lp)):
        ne = (a.float() != b.float()).nonzero()
        if ne.numel():
            t = int(ne[0])
            return (f"sequence {i}, response token {t}: rollout logprob {a[t].item():.9g} vs trainer "
                    f"{b[t].item():.9g} (Δ {b[t].item() - a[t].item():.3g})")
    if rollout_ids is None:
        return None
    for i, (r, t) in enumerate(zip(rollout_ids, trainer_ids)):
        if r is None or t is None or r.numel() == 0:
            continue
        flips = (r.long() != t.long()).any(-1)  # [L, positions]
        if flips.any():
            layer, pos = (int(x) for x in flips.nonzero()[0])
            return f"sequence {i}, input position {pos}: experts differ in MoE layer {moe_layers[layer]}"
    return None
