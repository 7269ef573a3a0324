"""Ray: start or join a cluster, place the trainer and rollout actor groups.

One placement group holds a bundle per trainer rank and per rollout actor, with the
resources the config names, so the same code runs on one CPU box, one GPU box (colocated
with fractional GPUs) or several nodes (SPREAD)."""
from __future__ import annotations

import logging
import os

import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ring_rl.config import RunConfig

log = logging.getLogger(__name__)


def init_ray(cfg: RunConfig) -> None:
    if ray.is_initialized():
        return
    kwargs: dict = {"include_dashboard": False, "log_to_driver": True}
    if cfg.ray.address:
        kwargs["address"] = cfg.ray.address
    else:
        kwargs["num_cpus"] = cfg.ray.num_cpus or os.cpu_count()
        if cfg.ray.num_gpus is not None:
            kwargs["num_gpus"] = cfg.ray.num_gpus
    # Actors import ring_rl from this checkout even when it is not pip-installed.
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    pythonpath = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": pythonpath, "TOKENIZERS_PARALLELISM": "false"}}
    ray.init(**kwargs)
    log.info("ray: %s", ray.cluster_resources())


def actor_groups(cfg: RunConfig):
    """A placement group and the bundle index of each trainer rank and rollout actor."""
    bundles, trainer_idx, rollout_idx = [], [], []
    for _ in range(cfg.ray.trainer_workers):
        trainer_idx.append(len(bundles))
        bundles.append(_bundle(cfg.ray.trainer_cpus_per_worker, cfg.ray.trainer_gpus_per_worker))
    for _ in range(cfg.rollout.num_actors):
        rollout_idx.append(len(bundles))
        bundles.append(_bundle(cfg.rollout.cpus_per_actor, cfg.rollout.gpus_per_actor))
    pg = placement_group(bundles, strategy=cfg.ray.placement_strategy)
    ray.get(pg.ready(), timeout=120)
    return pg, trainer_idx, rollout_idx


def placed(pg, index: int, cpus: float, gpus: float) -> dict:
    """Ray actor options pinning one actor to one bundle of the group."""
    return {
        "num_cpus": cpus,
        "num_gpus": gpus,
        "scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=pg,
                                                                placement_group_bundle_index=index),
    }


def _bundle(cpus: float, gpus: float) -> dict:
    bundle = {"CPU": cpus} if cpus else {}
    if gpus:
        bundle["GPU"] = gpus
    return bundle or {"CPU": 0.01}
