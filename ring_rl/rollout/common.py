"""What every rollout engine does before it samples: refuse stale weights, fix the seeds."""
from __future__ import annotations

from ring_rl.types import SamplingParams, StaleWeightsError  # noqa: F401 (re-exported)


def check_version_and_seeds(held: int, expected: int | None, params: SamplingParams, n: int,
                            seeds: list[int] | None) -> list[int]:
    """Raise StaleWeightsError unless `expected` is None or the held version; return one seed
    per sequence (the given ones, or derived from params.seed and the sequence index)."""
    if expected is not None and expected != held:
        raise StaleWeightsError(f"rollout asked for weights v{expected}, engine holds v{held}")
    return list(seeds) if seeds is not None else [params.seed * 1_000_003 + i for i in range(n)]
