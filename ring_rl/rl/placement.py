"""Ray: start or join a cluster, place the trainer and rollout actor groups.

One placement group holds a bundle per trainer rank and per rollout actor, with the
resources the config names, so the same code runs on one CPU box, one GPU box (colocated
with fractional GPUs) or several nodes (SPREAD)."""
from __future__ import annotations

import logging
import os

import ray
from ray.exceptions import GetTimeoutError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ring_rl.config import RunConfig

log = logging.getLogger(__name__)
RAY_JOB_CONFIG = "RAY_JOB_CONFIG_JSON_ENV_VAR"
PLACEMENT_TIMEOUT_S = 120  # set by Ray in a submitted job's driver


def init_ray(cfg: RunConfig) -> None:
    """Join `ray.address`, or the cluster a Ray job runs in (RAY_ADDRESS set by Ray), or
    start a local instance. A RAY_ADDRESS of http://... names a jobs server for `ring-rl
    submit`, not a cluster to join, and is ignored here."""
    if ray.is_initialized():
        return
    kwargs: dict = {"include_dashboard": False, "log_to_driver": True}
    env_address = os.environ.get("RAY_ADDRESS", "")
    address = cfg.ray.address or ("auto" if env_address and "://" not in env_address else None)
    if address:
        kwargs["address"] = address
    else:
        kwargs["address"] = "local"
        kwargs["num_cpus"] = cfg.ray.num_cpus or os.cpu_count()
        if cfg.ray.num_gpus is not None:
            kwargs["num_gpus"] = cfg.ray.num_gpus
    env_vars = {"TOKENIZERS_PARALLELISM": "false", **malloc_env(cfg.ray.malloc_mmap_threshold_mb)}
    if RAY_JOB_CONFIG not in os.environ:
        # Actors import ring_rl from this checkout even when it is not pip-installed. (In a
        # Ray job the job's working_dir does that, and the job's env vars must not be re-set.)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env_vars["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    kwargs["runtime_env"] = {"env_vars": env_vars}
    ray.init(**kwargs)
    log.info("ray: %s", ray.cluster_resources())


def malloc_env(mmap_threshold_mb: int | None) -> dict[str, str]:
    """glibc's malloc settings for the actor processes (read once, as a process starts).
    glibc serves blocks of 128 KiB and more from fresh mmaps until such blocks have been freed,
    then raises its threshold step by step: until then every new CPU activation page-faults
    on first touch and is unmapped when freed. On the CPU (32x8x4 GRPO steps, the tiny model)
    that made the first 3-4 steps' rollouts ~2x slower (185-212 vs ~95 ms); fixed thresholds
    give the steady pace from the first step (benchmarks/results/e2e_cpu.md)."""
    if mmap_threshold_mb is None:
        return {}
    mmap = mmap_threshold_mb << 20
    return {"MALLOC_MMAP_THRESHOLD_": str(mmap), "MALLOC_TRIM_THRESHOLD_": str(4 * mmap)}


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
    try:
        ray.get(pg.ready(), timeout=PLACEMENT_TIMEOUT_S)
    except GetTimeoutError:
        remove_placement_group(pg)
        raise RuntimeError(f"the cluster could not place {bundles} ({cfg.ray.placement_strategy}) in "
                           f"{PLACEMENT_TIMEOUT_S} s; it offers {ray.available_resources()} now "
                           "(fewer actors or smaller rollout/ray resources, or a bigger cluster)") from None
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
