"""init_ray: what the Ray worker processes of a local instance start with."""
from __future__ import annotations

import ray

from ring_rl.config import RunConfig
from ring_rl.rl.placement import init_ray, malloc_env


@ray.remote(num_cpus=1)
def _worker_env() -> dict:
    import os
    return {k: os.environ.get(k) for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                                           "TOKENIZERS_PARALLELISM")}


def test_workers_start_with_fixed_malloc_thresholds():
    """glibc reads MALLOC_*_ once, as a process starts: the workers must get them in their
    environment (ray.malloc_mmap_threshold_mb), not the driver after the fact."""
    assert malloc_env(None) == {}
    cfg = RunConfig.model_validate({"ray": {"num_cpus": 1, "malloc_mmap_threshold_mb": 64}})
    assert not ray.is_initialized()
    init_ray(cfg)
    try:
        env = ray.get(_worker_env.remote(), timeout=120)
    finally:
        ray.shutdown()
    assert env == {"MALLOC_MMAP_THRESHOLD_": str(64 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20),
                   "TOKENIZERS_PARALLELISM": "false"}
