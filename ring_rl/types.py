"""The data that crosses actors: a few explicit dataclasses with tensors inside.

Imported by the rollout engines, the trainer, the alignment checks and the driver; it
imports nothing of ring_rl, so it sits below all of them."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 16
    seed: int = 0


@dataclass
class RolloutBatch:
    """What a rollout engine returns, one entry per sequence.

    logprobs[i][t] is the engine's fp32 logprob of response token t under the
    temperature-scaled distribution (see ring_rl.model.sampling). router_ids[i] holds the
    experts each MoE layer chose at every input position the engine ran
    ([num_moe_layers, P_i + R_i - 1, top_k]; the last sampled token is never fed back)."""

    prompt_ids: list[torch.Tensor]
    response_ids: list[torch.Tensor]
    logprobs: list[torch.Tensor]
    finish_reasons: list[str]
    weight_version: int
    sampling: SamplingParams
    group_ids: list[int] = field(default_factory=list)
    router_ids: list[torch.Tensor] | None = None
    # How the engine decomposed the work, for exact-mode replay: the sequence indices of
    # each engine call (one packed prefill + decode steps), and its prefill chunk (0 = whole).
    schedule: list[list[int]] | None = None
    prefill_chunk: int = 0

    def __len__(self) -> int:
        return len(self.response_ids)

    @classmethod
    def concat(cls, parts: list["RolloutBatch"]) -> "RolloutBatch":
        """Sequences of several engine calls, in order; each call stays one schedule entry."""
        if not parts:
            raise ValueError("RolloutBatch.concat: nothing to concatenate")
        schedule, offset = [], 0
        for p in parts:
            for call in p.schedule or [list(range(len(p)))]:
                schedule.append([offset + i for i in call])
            offset += len(p)
        first = parts[0]
        return cls(
            prompt_ids=[x for p in parts for x in p.prompt_ids],
            response_ids=[x for p in parts for x in p.response_ids],
            logprobs=[x for p in parts for x in p.logprobs],
            finish_reasons=[x for p in parts for x in p.finish_reasons],
            weight_version=first.weight_version,
            sampling=first.sampling,
            group_ids=[x for p in parts for x in p.group_ids],
            router_ids=[x for p in parts for x in p.router_ids] if first.router_ids is not None else None,
            schedule=schedule,
            prefill_chunk=first.prefill_chunk,
        )

    @property
    def num_response_tokens(self) -> int:
        return sum(len(r) for r in self.response_ids)


@dataclass
class TrainBatch:
    """A rollout plus what the driver and alignment checks add before the update."""

    rollout: RolloutBatch
    rewards: torch.Tensor                            # [B]
    advantages: torch.Tensor                         # [B]
    old_logprobs: list[torch.Tensor] | None = None   # the trainer's, per response token
    token_weights: list[torch.Tensor] | None = None  # alignment policy weights/masks per token
