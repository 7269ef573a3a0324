"""rollout.max_staleness=1 through the real run (Ray, DeepSpeed on CPU, a random-init tiny
model): step n+1 is generated while the trainer updates on step n. Its rollout actor is
SIGKILLed in such an overlapped generate (the replacement must get the weights the others
hold, not the trainer's newer ones), then the driver is SIGKILLed and resumed. The run must
end with every step once, the data in order, one version per update, and the staleness in
the metrics: 1 for every overlapped step, 0 for the first step of each driver start."""
from __future__ import annotations

import re
import signal
import time

import pytest

from ring_rl.rl.metrics import read_metrics
from tests.rl.tiny_run import (
    CONFIG,
    GROUP,
    PROMPTS,
    find_actor,
    kill_session,
    overrides,
    prepare,
    ring_rl,
    run_ok,
    sigkill,
    wait_for,
)

pytestmark = pytest.mark.slow
STEPS = 7


def _steps(run_dir):
    return [r["step"] for r in read_metrics(run_dir)] if (run_dir / "metrics.jsonl").exists() else []


def _overlapped_run(tmp_path, steps: int, checkpoint_every: int):
    """A random-init tiny run with rollout.max_staleness=1, started → (run_dir, logs, args, process)."""
    prepared = prepare(tmp_path / "tiny")
    run_dir, logs = tmp_path / "run", [tmp_path / "log0.txt", tmp_path / "log1.txt"]
    args = ["train", "--config", str(CONFIG), *overrides(prepared, run_dir, steps, "rollout.max_staleness=1",
                                                           f"run.checkpoint_every={checkpoint_every}",
                                                           "run.keep_checkpoints=10")]
    return run_dir, logs, args, ring_rl(*args, log=logs[0])


def test_overlapped_run_survives_a_rollout_kill_and_a_resume(tmp_path):
    run_dir, logs, args, proc = _overlapped_run(tmp_path, STEPS, checkpoint_every=1)
    try:
        wait_for(lambda: 2 in _steps(run_dir), 240, "step 2", proc, logs[0])
        find_actor(proc.pid, "ray::RolloutWorker", busy_with="generate", timeout=60).kill()
        wait_for(lambda: (run_dir / "checkpoints/step_000004").exists(), 240, "step 4's checkpoint", proc, logs[0])
    finally:
        sigkill(proc)
        kill_session(proc)
    first = logs[0].read_text()
    assert re.search(r"rollout actor 0 died during (generate|load_weights) .*: replacing it", first)
    proc = ring_rl(*args, "--resume", log=logs[1])
    try:
        assert proc.wait(timeout=300) == 0, logs[1].read_text()[-4000:]
    finally:
        kill_session(proc)
    resumed_at = int(re.search(r"resuming from \S+ \(step (\d+)\)", logs[1].read_text()).group(1))
    assert resumed_at >= 4

    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # none lost, none repeated
    assert [r["data/index"] for r in rows] == [PROMPTS * s for s in range(1, STEPS + 1)]
    assert [r["weights/version"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["rollout/staleness"] for r in rows] == [0.0 if s in (1, resumed_at + 1) else 1.0
                                                      for s in range(1, STEPS + 1)]
    assert sum(r["rollout/actor_restarts"] > 0 for r in rows[:resumed_at]) >= 1
    for r in rows:
        assert r["rollout/sequences"] == PROMPTS * GROUP and r["train/tokens"] > 0 and r["train/fused"] == 1.0
    # The next step's rollout is made inside every step but the last (and the one a resume redid).
    for r, after in zip(rows, rows[1:]):
        if r["step"] != resumed_at:
            assert r["perf/overlap_s"] >= after["perf/rollout_s"] > 0
    assert rows[-1]["perf/overlap_s"] < 0.05


def test_queued_updates_and_a_stop_between_them(tmp_path):
    """With rollout.max_staleness=1 step n+1's update waits in the trainer's queue while step n's
    runs, except after an evaluation or a checkpoint step. A stop request (SIGTERM) that lands
    while the next update is queued (timed for that; it may land before) waits for it: the
    checkpoint holds exactly the steps the metrics list. The resumed run continues with no
    step lost or repeated, one version per step."""
    steps = 10
    run_dir, logs, args, proc = _overlapped_run(tmp_path, steps, checkpoint_every=4)
    try:
        wait_for(lambda: 4 in _steps(run_dir), 240, "step 4", proc, logs[0])
        while 5 not in _steps(run_dir) and proc.poll() is None:
            time.sleep(0.005)
        # Step 6 queues step 7's update once step 7's rollout is scored, most of a step in.
        time.sleep(0.7 * read_metrics(run_dir)[-1]["perf/step_s"])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM, logs[0].read_text()[-4000:]
    finally:
        kill_session(proc)
    first = logs[0].read_text()
    stopped_at = int(re.search(r"stopped after step (\d+) of", first).group(1))
    assert 6 <= stopped_at < steps and _steps(run_dir) == list(range(1, stopped_at + 1))
    deferred = re.search(r"stop requested during step (\d+): finishing step (\d+), already queued", first)
    if deferred:  # the usual case: the signal lands in step 6 after step 7 was queued
        assert int(deferred.group(2)) == int(deferred.group(1)) + 1 == stopped_at
    assert (run_dir / f"checkpoints/step_{stopped_at:06d}").exists()
    run_ok(*args, "--resume", log=logs[1], timeout=300)

    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert [r["data/index"] for r in rows] == [PROMPTS * s for s in range(1, steps + 1)]
    assert [r["weights/version"] for r in rows] == list(range(1, steps + 1))
    queued = {r["step"] for r in rows if r["perf/queued"]}
    assert {2, 3, 4, 6}.issubset(queued)           # during steps 1, 2, 3 and 5
    assert not queued & {1, 5, 9, stopped_at + 1}  # first step; after checkpoints 4 and 8; a resume's first
