"""What a GRPO update checks on its input and reports: per-token inputs that line up with the
responses, and token-weighted means of the per-micro-batch loss statistics."""
from __future__ import annotations

import torch

from ring_rl.types import TrainBatch


def check_batch(batch: TrainBatch, old: list[torch.Tensor]) -> None:
    """Per-token inputs must line up with the responses; say which one does not."""
    lens = [len(r) for r in batch.rollout.response_ids]
    if tuple(batch.advantages.shape) != (len(lens),):
        raise ValueError(f"TrainBatch.advantages: shape {tuple(batch.advantages.shape)}, expected ({len(lens)},)")
    for name, values in (("old_logprobs", old), ("token_weights", batch.token_weights)):
        if values is None:
            continue
        if len(values) != len(lens):
            raise ValueError(f"TrainBatch.{name}: {len(values)} sequences, the rollout has {len(lens)}")
        for i, (v, n) in enumerate(zip(values, lens)):
            if v.numel() != n:
                raise ValueError(f"TrainBatch.{name}[{i}]: {v.numel()} values for a {n}-token response")


class StepStats:
    """Metrics of one train_step: token-weighted means of the per-micro-batch stats."""

    def __init__(self):
        self.tokens, self.loss, self.steps = 0, 0.0, 0
        self.sums: dict[str, float] = {}
        self.ratio_max, self.ratio_min = float("-inf"), float("inf")
        self.grad_norms: list[float] = []
        self.lr = 0.0

    def add_micro(self, loss, stats: dict, entropy: torch.Tensor, tokens: int) -> None:
        self.loss += float(loss)
        self.tokens += tokens
        self.ratio_max = max(self.ratio_max, float(stats.pop("ratio_max")))
        self.ratio_min = min(self.ratio_min, float(stats.pop("ratio_min")))
        stats["entropy"] = entropy.float().mean()
        for k, v in stats.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v) * tokens

    def add_step(self, grad_norm: float, lr: float) -> None:
        self.steps += 1
        self.grad_norms.append(grad_norm)
        self.lr = lr

    def result(self) -> dict[str, float]:
        out = {k: v / max(self.tokens, 1) for k, v in self.sums.items()}
        out.update({
            "loss": self.loss / max(self.steps, 1),  # mean over optimizer steps of the minibatch loss
            "ratio_max": self.ratio_max if self.tokens else 1.0,
            "ratio_min": self.ratio_min if self.tokens else 1.0,
            "grad_norm": sum(self.grad_norms) / max(len(self.grad_norms), 1),
            "grad_norm_max": max(self.grad_norms, default=0.0),
            "lr": self.lr,
            "optimizer_steps": self.steps,
            "tokens": self.tokens,
        })
        return out
