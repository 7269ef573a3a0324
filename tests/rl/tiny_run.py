"""What the end-to-end fault and cluster tests share: a tiny random-init model and arithmetic
set made once, the overrides of a fast run, and `ring-rl` subprocesses in sessions of their
own (so a test can SIGKILL a driver with its local Ray, and nothing outlives the test)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs/tiny-arith.yaml"
PROMPTS, GROUP = 2, 4  # 8 sequences a step


def prepare(base: Path) -> Path:
    """A random-init `tiny` checkpoint and a 200/20 arithmetic set under `base` (seconds)."""
    from ring_rl.model.factory import build_random_checkpoint
    from ring_rl.rl.arith import write_arith_dataset

    build_random_checkpoint("tiny", base / "model", seed=0)
    write_arith_dataset(base / "data", n_train=200, n_test=20, seed=0)
    return base


def overrides(prepared: Path, run_dir: Path, steps: int, *extra: str) -> list[str]:
    return [
        f"run.dir={run_dir}", f"model.name_or_path={prepared / 'model'}", f"run.steps={steps}",
        f"data.train_files=[{prepared / 'data/train.jsonl'}]", f"data.test_files=[{prepared / 'data/test.jsonl'}]",
        f"run.prompts_per_step={PROMPTS}", f"rollout.group_size={GROUP}", "trainer.micro_batch_size=8",
        "run.eval_every=0", "sft.enabled=false", "trainer.lr_schedule=constant", "trainer.warmup_steps=0", *extra,
    ]


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}


def ring_rl(*args: str, log: Path, environ: dict | None = None) -> subprocess.Popen:
    """`python -m ring_rl.cli ARGS` in a session of its own, output to `log`."""
    out = open(log, "w")
    return subprocess.Popen([sys.executable, "-m", "ring_rl.cli", *args], cwd=ROOT, env=environ or env(),
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def run_ok(*args: str, log: Path, environ: dict | None = None, timeout: float = 120) -> str:
    """Run to the end; the output, or a failure showing it."""
    proc = ring_rl(*args, log=log, environ=environ)
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        kill_session(proc)
    text = log.read_text()
    assert rc == 0, f"ring-rl {' '.join(args[:2])} exited {rc}:\n{text[-4000:]}"
    return text


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the process's session (the driver, its local Ray, its actors) and reap it."""
    members = session_members(proc.pid)
    for p in members:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(members, timeout=30)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def session_members(sid: int) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                found.append(p)
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
    return found


def find_actor(root_pid: int, title: str, busy_with: str | None = None, timeout: float = 120) -> psutil.Process:
    """The process of a Ray actor whose title starts with `title` (e.g. ray::RolloutWorker)
    among the descendants of `root_pid`; with `busy_with`, only while it runs that method."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for p in psutil.Process(root_pid).children(recursive=True):
            try:
                cmd = " ".join(p.cmdline())
            except psutil.Error:
                continue
            if cmd.startswith(title) and (busy_with is None or f".{busy_with}" in cmd):
                return p
        time.sleep(0.01)
    raise AssertionError(f"no {title} process{' in ' + busy_with if busy_with else ''} under pid {root_pid}")


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.2)
    tail = log.read_text()[-4000:] if log is not None and log.exists() else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


def sigkill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
