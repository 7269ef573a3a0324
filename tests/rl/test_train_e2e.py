"""`ring-rl train` end to end on real Ray, DeepSpeed, datasets and math-verify: a short run
is SIGKILLed after step 2, resumed, and must continue without a lost or repeated step."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ring_rl.rl.metrics import read_metrics

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
STEPS, PROMPTS = 6, 2  # steps 3-6 keep the run alive while the test kills it after step 2


def _overrides(tmp: Path) -> list[str]:
    return [
        f"run.dir={tmp}/run", f"model.name_or_path={tmp}/sft", f"run.steps={STEPS}",
        f"data.train_files=[{tmp}/data/train.jsonl]", f"data.test_files=[{tmp}/data/test.jsonl]",
        "data.builtin_args.n_train=200", "data.builtin_args.n_test=20",
        "sft.steps=2", "sft.batch_size=8", "sft.target_accuracy=null", f"run.prompts_per_step={PROMPTS}", "rollout.group_size=4",
        "run.checkpoint_every=1", "run.keep_checkpoints=5", "run.eval_every=2", "run.eval_prompts=8",
        "trainer.micro_batch_size=8",
    ]


def _train(tmp: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "ring_rl.cli", "train", "--config", str(ROOT / "configs/tiny-arith.yaml"),
           *extra, *_overrides(tmp)]
    log = open(tmp / f"log{len(list(tmp.glob('log*')))}.txt", "w")
    # A session of its own: SIGKILL to the group takes the driver and its local Ray with it.
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


def test_train_is_killed_and_resumes_without_gaps(tmp_path):
    first = _train(tmp_path)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and first.poll() is None:
            steps = [r["step"] for r in read_metrics(tmp_path / "run")]
            if 2 in steps and (tmp_path / "run/checkpoints/step_000002").exists():
                break
            time.sleep(0.02)  # a step takes a fraction of a second: step 4 must not finish first
        else:
            pytest.fail(f"step 2 never finished:\n{(tmp_path / 'log0.txt').read_text()[-3000:]}")
    finally:
        _kill(first)
    killed_at = max(r["step"] for r in read_metrics(tmp_path / "run"))
    assert killed_at < STEPS, "the run ended before it could be killed"

    second = _train(tmp_path, "--resume")
    try:
        assert second.wait(timeout=300) == 0, (tmp_path / "log1.txt").read_text()[-3000:]
    finally:
        _kill(second)
    log = (tmp_path / "log1.txt").read_text()
    assert "resuming from" in log

    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # none lost, none repeated
    assert [r["data/index"] for r in rows] == [PROMPTS * s for s in range(1, STEPS + 1)]
    assert [r["weights/version"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:  # the parts really ran: rewards scored, tokens trained, logprobs diffed
        assert r["align/tokens"] > 0 and r["train/tokens"] > 0 and 0.0 <= r["reward/mean"] <= 1.0
        assert abs(r["align/abs_delta_mean"]) < 1e-4  # same fp32 model in both engines
    assert "eval/accuracy" in rows[-1]
    ckpt = tmp_path / f"run/checkpoints/step_{STEPS:06d}"
    assert (ckpt / "trainer/model.safetensors").exists()
    state = json.loads((ckpt / "driver_state.json").read_text())
    assert state["step"] == STEPS and state["stream"]["index"] == PROMPTS * STEPS
    assert (tmp_path / "run/config.yaml").exists() and list((tmp_path / "run/tensorboard").iterdir())
