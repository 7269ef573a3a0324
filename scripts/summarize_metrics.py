"""One line per run from a metrics.jsonl: steps, alignment (bitwise-equal fraction, router
flips, exact-mode verdicts) and the median step split. Used by scripts/gpu_vllm_checks.sh."""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

from ring_rl.rl.metrics import read_metrics


def summarize(path: str) -> str:
    """path: a run directory or its metrics.jsonl."""
    p = Path(path)
    rows = read_metrics(p.parent if p.is_file() else p)
    steps = [r for r in rows if "perf/step_s" in r]
    if not steps:
        return f"{path}: no steps"

    def med(key):
        vals = [r[key] for r in steps[1:] or steps if key in r]
        return statistics.median(vals) if vals else float("nan")

    sync_gb = f" ({med('perf/sync_gbytes'):.3f} GB broadcast)" if any("perf/sync_gbytes" in r for r in steps) else ""
    eq = [r.get("align/bitwise_equal_frac", float("nan")) for r in steps]
    flips = [r.get("router/flip_mean", 0.0) for r in steps]
    exact = [r.get("align/exact_ok") for r in steps if "align/exact_ok" in r]
    return (f"{path}: {len(steps)} steps; bitwise_equal_frac min {min(eq):.4f} median {statistics.median(eq):.4f}; "
            f"router flips max {max(flips):.4g}; exact_ok {sum(x == 1.0 for x in exact)}/{len(exact)}; "
            f"abs_delta_max median {med('align/abs_delta_max'):.3g}; median (after step 1) step {med('perf/step_s'):.3f} s "
            f"= rollout {med('perf/rollout_s'):.3f} + align/train {med('perf/train_s'):.3f} + sync {med('perf/sync_s'):.3f}{sync_gb} "
            f"+ reward {med('perf/reward_s'):.3f}; rollout {med('perf/rollout_tokens_per_s'):.0f} tok/s; "
            f"accuracy first {steps[0].get('reward/accuracy', float('nan')):.3f} last {steps[-1].get('reward/accuracy', float('nan')):.3f}")


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(summarize(p))
