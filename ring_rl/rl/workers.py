"""The driver's handle on its actors: one trainer, N rollout workers, versioned weights.

Every remote call has a timeout, so a hung actor is reported instead of waited on."""
from __future__ import annotations

import logging
from pathlib import Path

import ray

from ring_rl.config import RunConfig
from ring_rl.rl.placement import actor_groups, init_ray, placed
from ring_rl.rollout.worker import RolloutWorker
from ring_rl.types import RolloutBatch, SamplingParams, TrainBatch

log = logging.getLogger(__name__)
CALL_TIMEOUT_S = 1800.0


class Workers:
    def __init__(self, cfg: RunConfig, model_dir: str | Path, trainer_state: Path | None = None):
        from ring_rl.trainer.actor import TrainerActor

        init_ray(cfg)
        self.cfg = cfg
        self.pg, trainer_idx, rollout_idx = actor_groups(cfg)
        t_cpus, t_gpus = cfg.ray.trainer_cpus_per_worker, cfg.ray.trainer_gpus_per_worker
        device = "cuda" if t_gpus else "cpu"
        self.trainer = TrainerActor.options(**placed(self.pg, trainer_idx[0], t_cpus, t_gpus)).remote(
            str(model_dir), cfg.trainer, cfg.run.seed, device, int(max(t_cpus, 1)),
            cfg.run.steps * cfg.trainer.ppo_epochs * cfg.trainer.num_minibatches)
        if trainer_state is not None:
            self._get(self.trainer.load.remote(str(trainer_state)))
        r_cpus, r_gpus = cfg.rollout.cpus_per_actor, cfg.rollout.gpus_per_actor
        actor_cls = ray.remote(RolloutWorker)
        self.rollouts = [
            actor_cls.options(**placed(self.pg, i, r_cpus, r_gpus)).remote(
                str(model_dir), cfg.rollout.engine, cfg.model.dtype, "cuda" if r_gpus else "cpu",
                0, int(max(r_cpus, 1)))
            for i in rollout_idx
        ]
        self.version = -1
        self.sync_weights()  # rollout starts from the trainer's weights (a resumed run's too)

    def _get(self, refs):
        return ray.get(refs, timeout=CALL_TIMEOUT_S)

    def generate(self, prompts: list[list[int]], params: SamplingParams, seeds: list[int],
                 group_ids: list[int], expect_version: bool = True) -> RolloutBatch:
        """Split the sequences over the rollout workers (whole groups stay together) and merge."""
        n = len(self.rollouts)
        bounds = [round(i * len(prompts) / n) for i in range(n + 1)]
        version = self.version if expect_version else None
        refs = [w.generate.remote(prompts[lo:hi], params, version, seeds[lo:hi], group_ids[lo:hi])
                for w, lo, hi in zip(self.rollouts, bounds, bounds[1:]) if hi > lo]
        parts = self._get(refs)
        return RolloutBatch(
            prompt_ids=[x for p in parts for x in p.prompt_ids],
            response_ids=[x for p in parts for x in p.response_ids],
            logprobs=[x for p in parts for x in p.logprobs],
            finish_reasons=[x for p in parts for x in p.finish_reasons],
            weight_version=parts[0].weight_version,
            sampling=params,
            group_ids=[x for p in parts for x in p.group_ids],
            router_ids=[x for p in parts for x in p.router_ids] if parts[0].router_ids is not None else None,
        )

    def trainer_logprobs(self, rollout: RolloutBatch, replay: bool = False):
        """(per-sequence fp32 logprobs of the response tokens, per-sequence router ids)."""
        logprobs, _entropy, router_ids = self._get(self.trainer.compute_logprobs.remote(rollout, None, replay))
        return logprobs, router_ids

    def train(self, batch: TrainBatch) -> dict:
        return self._get(self.trainer.train_step.remote(batch, self.cfg.alignment.routing_replay))

    def sync_weights(self) -> int:
        """Trainer → object store → every rollout worker; returns the new version. The
        trainer's result goes to the workers as an ObjectRef, never through the driver."""
        payload = self.trainer.weights_for_rollout.remote()
        versions = self._get([w.load_weights_payload.remote(payload) for w in self.rollouts])
        self.version = versions[0]
        return self.version

    def save_trainer(self, path: Path) -> None:
        self._get(self.trainer.save.remote(str(path)))

    def shutdown(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for actor in [self.trainer, *self.rollouts]:
            ray.kill(actor)
        remove_placement_group(self.pg)
