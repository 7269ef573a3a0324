"""Runs survive the faults clusters have, on real Ray and DeepSpeed (CPU, a random-init tiny model):
- a rollout actor SIGKILLed while it generates is replaced, gets the current weights and
  re-runs its prompts; then the trainer actor is SIGKILLed and the run (run.auto_resume)
  restarts from its newest checkpoint. The run ends with every step once, each with the
  step's full batch and no duplicated sequence;
- the driver SIGKILLed at random points (three seeds) resumes with --resume each time, the
  last time past a corrupt newest checkpoint (refused by name, the previous one used), and
  ends with no lost or repeated step;
- the checkpoint fallback itself, per kind of damage, on checkpoints in the real layout."""
from __future__ import annotations

import json
import logging
import random
import re
import shutil
import time

import pytest
import torch
from safetensors.torch import save_file

from ring_rl.rl.metrics import read_metrics
from ring_rl.rl.run_state import CheckpointDirs
from ring_rl.trainer import checkpoint as trainer_ckpt
from tests.rl.tiny_run import (CONFIG, GROUP, PROMPTS, find_actor, kill_session, overrides, prepare, ring_rl,
                               sigkill, wait_for)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare(tmp_path_factory.mktemp("tiny"))


def _steps(run_dir):
    return [r["step"] for r in read_metrics(run_dir)] if (run_dir / "metrics.jsonl").exists() else []


def _assert_clean_history(run_dir, steps: int) -> list[dict]:
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))  # none lost, none repeated
    assert [r["data/index"] for r in rows] == [PROMPTS * s for s in range(1, steps + 1)]
    assert [r["weights/version"] for r in rows] == list(range(1, steps + 1))
    for r in rows:  # the parts really ran, on the step's whole batch
        assert r["rollout/sequences"] == PROMPTS * GROUP and r["train/tokens"] > 0
        assert abs(r["align/abs_delta_mean"]) < 1e-4  # the rollout's weights are the trainer's
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [s for s in range(1, steps + 1) for _ in range(GROUP)]
    return rows


def test_rollout_and_trainer_actor_deaths_mid_run(prepared, tmp_path):
    steps, run_dir, log = 7, tmp_path / "run", tmp_path / "log.txt"
    proc = ring_rl("train", "--config", str(CONFIG), *overrides(
        prepared, run_dir, steps, "run.checkpoint_every=1", "run.keep_checkpoints=10", "run.auto_resume=true"),
        log=log)
    try:
        wait_for(lambda: 2 in _steps(run_dir), 240, "step 2", proc, log)
        victim = find_actor(proc.pid, "ray::RolloutWorker", busy_with="generate", timeout=60)
        killed_during = max(_steps(run_dir)) + 1
        victim.kill()
        wait_for(lambda: killed_during + 1 in _steps(run_dir), 240, "two steps after the rollout kill", proc, log)
        trainer_killed_during = max(_steps(run_dir)) + 1
        find_actor(proc.pid, "ray::TrainerActor", timeout=10).kill()
        assert proc.wait(timeout=300) == 0, log.read_text()[-4000:]
    finally:
        kill_session(proc)
    text = log.read_text()
    # Found generating; by the time the signal lands it may have moved on to loading weights.
    assert re.search(r"rollout actor 0 died during (generate|load_weights) .*: replacing it \(weights version", text)
    assert "trainer actor died during" in text and "steps after it are redone (restart 1 of 2)" in text
    assert trainer_killed_during <= steps
    rows = _assert_clean_history(run_dir, steps)
    assert rows[killed_during - 1]["rollout/actor_restarts"] == 1  # replaced within that very step
    assert all(r["rollout/actor_restarts"] == 0 for r in rows[:killed_during - 1])


def test_driver_sigkilled_three_times_resumes_without_gaps(prepared, tmp_path):
    """Seeds 0, 1, 2 each pick a step after which to kill and a delay into the next step; the
    run is resumed each time. Before the last resume the newest checkpoint is corrupted."""
    steps, run_dir = 10, tmp_path / "run"
    args = ["train", "--config", str(CONFIG), *overrides(prepared, run_dir, steps, "run.checkpoint_every=1",
                                                           "run.keep_checkpoints=3")]
    kills = []
    for seed in range(3):
        rng = random.Random(seed)
        done = max(_steps(run_dir), default=0)
        after, delay = min(rng.randint(done + 1, done + 2), steps - 2), rng.uniform(0.0, 0.5)
        log = tmp_path / f"log{seed}.txt"
        proc = ring_rl(*(args + (["--resume"] if seed else [])), log=log)
        try:
            # (and a first checkpoint: --resume of a run that saved none is refused, rightly).
            # A resumed run must have started first: when an earlier kill landed late, `after`
            # (capped at steps - 2) can already be on disk, and the kill would hit a process
            # that had not even logged its resume.
            wait_for(lambda after=after, seed=seed, log=log: (not seed or "resuming from" in log.read_text())
                     and after in _steps(run_dir) and CheckpointDirs(run_dir).latest(), 240,
                     f"step {after}", proc, log)
            time.sleep(delay)
            sigkill(proc)
        finally:
            kill_session(proc)
        kills.append(max(_steps(run_dir)))
    assert kills[-1] < steps, f"the run ended before its last kill (killed after steps {kills})"

    ckpts = CheckpointDirs(run_dir, keep=3).complete()
    assert len(ckpts) >= 2, [c.name for c in ckpts]
    newest, previous = ckpts[-1], ckpts[-2]
    weights = newest / "trainer/model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a torn write

    log = tmp_path / "log-final.txt"
    proc = ring_rl(*args, "--resume", log=log)
    try:
        assert proc.wait(timeout=300) == 0, log.read_text()[-4000:]
    finally:
        kill_session(proc)
    text = log.read_text()
    assert f"checkpoint {newest.name} refused: {weights}: checksum mismatch" in text
    assert f"falling back to the previous checkpoint {previous}" in text
    assert f"resuming from {previous} (step {int(previous.name[5:])})" in text
    _assert_clean_history(run_dir, steps)
    assert (run_dir / "checkpoints" / f"step_{steps:06d}").exists()


# -- the fallback itself, per kind of damage --------------------------------------------------
def _fake_run_checkpoint(ckpts: CheckpointDirs, step: int) -> None:
    """A checkpoint in the real layout: safetensors weights and a plain optimizer file under
    trainer/ with their sha256 manifest, then the driver state; all written by the real code."""
    staging = ckpts.staging(step)
    trainer = staging / "trainer.tmp"
    trainer.mkdir()
    save_file({"w": torch.randn(64, 64)}, str(trainer / "model.safetensors"))
    trainer_ckpt.write_optimizer_file(trainer, 0, {"optimizer": {"state": {0: {"exp_avg": torch.randn(64)}}},
                                                   "version": step, "optimizer_steps": step})
    trainer_ckpt.commit(trainer, staging / "trainer", {"version": step})
    ckpts.commit(staging, step, {"stream": {"epoch": 0, "index": 2 * step}, "accuracy_before": None})


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGE = {
    "weights truncated": ("trainer/model.safetensors", _truncate, "checksum mismatch"),
    "optimizer bit flipped": ("trainer/optimizer_rank0.pt", _flip, "checksum mismatch"),
    "manifest truncated": ("trainer/trainer_state.json", _truncate, "not valid JSON"),
    "manifest missing": ("trainer/trainer_state.json", lambda p: p.unlink(), "missing"),
    "driver state truncated": ("driver_state.json", lambda p: p.write_text('{"step": 3, "str'), "not valid JSON"),
    "driver state without stream": ("driver_state.json", lambda p: p.write_text('{"step": 3}'), "no 'stream' entry"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_newest_valid_checkpoint_skips_a_damaged_one(tmp_path, caplog, damage):
    ckpts = CheckpointDirs(tmp_path, keep=5)
    for step in (1, 2, 3):
        _fake_run_checkpoint(ckpts, step)
    rel, spoil, reason = DAMAGE[damage]
    bad = ckpts.root / "step_000003" / rel
    spoil(bad)
    with caplog.at_level(logging.WARNING, logger="ring_rl.train"):
        chosen = ckpts.newest_valid()
    assert chosen == ckpts.root / "step_000002"
    assert f"checkpoint step_000003 refused: {bad}: {reason}" in caplog.text
    assert f"falling back to the previous checkpoint {chosen}" in caplog.text
    # Set aside for a person to inspect, no longer a resume candidate; the fallback is stable.
    assert [p.name for p in ckpts.complete()] == ["step_000001", "step_000002"]
    assert (ckpts.root / "step_000003.refused-0" / rel).exists() or "missing" in reason
    assert ckpts.newest_valid() == chosen


def test_every_checkpoint_damaged_leaves_none(tmp_path, caplog):
    ckpts = CheckpointDirs(tmp_path, keep=5)
    _fake_run_checkpoint(ckpts, 1)
    _truncate(ckpts.root / "step_000001/trainer/model.safetensors")
    with caplog.at_level(logging.WARNING, logger="ring_rl.train"):
        assert ckpts.newest_valid() is None
    assert "no usable checkpoint left" in caplog.text
    shutil.rmtree(tmp_path / "checkpoints")
