"""The trainer as a Ray actor: the engine's methods, called remotely by the driver.

`ray.remote` on a class only records options; nothing connects to Ray until `.remote()` is
called, so importing this module works without a running cluster. Use `TrainerEngine`
directly where no actor is needed (tests, `ring-rl sft`)."""
from __future__ import annotations

import os

import ray

from ring_rl.trainer.engine import TrainerEngine


@ray.remote
class TrainerActor(TrainerEngine):
    """TrainerEngine(model_dir, trainer_cfg, seed, device, num_threads, total_steps) in its
    own process: compute_logprobs, train_step, sft_step, weights_for_rollout, save, load,
    save_model."""

    def get_pid(self) -> int:
        return os.getpid()
