"""MetricsLogger: the JSONL rows and the TensorBoard scalars a run writes each step."""
from __future__ import annotations

import math

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ring_rl.rl.metrics import MetricsLogger, read_metrics


def test_each_step_is_a_jsonl_row_and_tensorboard_scalars(tmp_path):
    log = MetricsLogger(tmp_path)
    log.log(1, {"reward/mean": 0.25, "train/grad_norm": 1.5, "align/k3": float("nan"), "note": "warm-up"})
    log.log(2, {"reward/mean": 0.75, "train/grad_norm": 0.5, "align/k3": 2e-4, "note": "x"})
    log.close()
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["align/k3"] is None and rows[1]["note"] == "x"
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["align/k3", "reward/mean", "train/grad_norm"]
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert scalars["reward/mean"] == [(1, 0.25), (2, 0.75)]
    assert scalars["train/grad_norm"] == [(1, 1.5), (2, 0.5)]
    assert [s for s, _ in scalars["align/k3"]] == [2] and math.isclose(scalars["align/k3"][0][1], 2e-4, rel_tol=1e-6)
    assert events.Scalars("reward/mean")[1].wall_time == rows[1]["time"]
