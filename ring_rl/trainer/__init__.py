"""The DeepSpeed trainer: per-token logprobs/entropy of given sequences, GRPO and SFT updates,
weights for the rollout engines, atomic checkpoints.

`TrainerEngine` is imported lazily (it pulls DeepSpeed); the Ray actor is in `actor.py`."""
from __future__ import annotations

__all__ = ["TrainerEngine"]


def __getattr__(name: str):
    if name == "TrainerEngine":
        from ring_rl.trainer.engine import TrainerEngine
        return TrainerEngine
    raise AttributeError(f"module 'ring_rl.trainer' has no attribute {name!r}")
