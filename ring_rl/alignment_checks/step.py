"""The alignment checks of one GRPO step, as one callable the trainer runs before its update.

The driver builds a `StepCheck` and hands it to the trainer with the batch; the trainer calls
it with its own logprobs and experts of the rollout's tokens (same weights version), then
updates with the old logprobs and token weights it returns, or not at all when the gate says
skip/abort or exact mode's promise broke. Running it in the trainer lets a single-pass update
reuse its own forward as the logprob pass (`TrainerEngine.check_and_train`); the trainer only
sees a callable, so it imports nothing of alignment_checks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ring_rl.alignment_checks.exact import first_exact_difference
from ring_rl.alignment_checks.gate import check_gate
from ring_rl.alignment_checks.metrics import logprob_mismatch, router_flip_rate
from ring_rl.alignment_checks.policies import apply_policy
from ring_rl.config import AlignmentConfig
from ring_rl.types import AlignmentReport, RolloutBatch


@dataclass
class StepCheck:
    cfg: AlignmentConfig
    moe_layers: list[int]  # sorted MoE layer indices (the order of the router id tensors)

    def __call__(self, rollout: RolloutBatch, trainer_lp: list[torch.Tensor],
                 trainer_ids: list[torch.Tensor] | None) -> AlignmentReport:
        """Mismatch metrics, router flips, exact mode's check, the policy and the gate."""
        metrics = logprob_mismatch(rollout.logprobs, trainer_lp)
        metrics.update(router_flip_metrics(rollout, trainer_ids, self.moe_layers))
        broken = None
        if self.cfg.mode == "exact":
            broken = first_exact_difference(rollout.logprobs, trainer_lp, rollout.router_ids, trainer_ids,
                                            self.moe_layers)
            metrics["align/exact_ok"] = float(broken is None)
        policy = apply_policy(self.cfg, rollout.logprobs, trainer_lp)
        metrics.update(policy.metrics)
        gate = check_gate(self.cfg.gate, metrics) if metrics["align/tokens"] else None
        if gate is not None:
            metrics.update(gate.as_row())
        return AlignmentReport(metrics, list(trainer_lp), policy.old_logprobs, policy.token_weights,
                               gate.action if gate is not None else "none", broken)


def router_flip_metrics(rollout: RolloutBatch, trainer_ids: list | None, moe_layers: list[int]) -> dict[str, float]:
    """Per MoE layer, the share of positions where the trainer picked another expert set
    than the rollout engine recorded (both [layers, positions, k] per sequence)."""
    pairs = [(r, t) for r, t in zip(rollout.router_ids or [], trainer_ids or [])
             if r is not None and t is not None and r.shape[1] > 0]
    if not pairs:
        return {}
    rates = router_flip_rate(torch.cat([r for r, _ in pairs], 1), torch.cat([t for _, t in pairs], 1))
    out = {f"router/flip_layer_{i}": float(v) for i, v in zip(moe_layers, rates)}
    out["router/flip_mean"] = float(rates.mean())
    return out
