"""alignment.mode=exact through the real run: Ray actors, the native engine, DeepSpeed on
CPU. Every step of a 20-step run must be bitwise equal (64 responses per step, prompts of
mixed lengths) with no router flip, and the report must say so. Default mode is unchanged."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ring_rl.rl.metrics import read_metrics

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
STEPS = 20


def test_exact_mode_run_is_bitwise_every_step(tmp_path):
    overrides = [
        "alignment.mode=exact", f"run.dir={tmp_path}/run", f"model.name_or_path={tmp_path}/sft",
        f"run.steps={STEPS}", f"data.train_files=[{tmp_path}/data/train.jsonl]",
        f"data.test_files=[{tmp_path}/data/test.jsonl]", "data.builtin_args.n_train=400",
        "data.builtin_args.n_test=20", "sft.steps=20", "sft.batch_size=16", "sft.target_accuracy=null", "run.prompts_per_step=8",
        "rollout.group_size=8", "run.checkpoint_every=0", "run.eval_every=1000", "run.eval_prompts=8",
        "trainer.micro_batch_size=64", "trainer.lr=1e-3",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "ring_rl.cli", "train", "--config", str(ROOT / "configs/tiny-arith.yaml"), *overrides]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        assert r["align/tokens"] >= 64 and r["rollout/sequences"] == 64
        assert r["align/bitwise_equal_frac"] == 1.0, f"step {r['step']}: {r['align/bitwise_equal_frac']}"
        assert r["align/abs_delta_max"] == 0.0 and r["router/flip_mean"] == 0.0
        assert r["align/exact_ok"] == 1.0 and r["train/optimizer_steps"] >= 1
    assert len({round(r["reward/mean"], 6) for r in rows}) > 1  # it trained on changing rollouts
    report = (tmp_path / "run/report.html").read_text()
    assert f"bitwise equal at every step: {STEPS} steps" in report
