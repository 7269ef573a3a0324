"""`ring-rl submit|status|logs|stop`: a training run as a Ray Job, over the Ray Jobs API.

What is shipped: this checkout (the directory holding `ring_rl/`) as the job's working_dir,
less `.git`, virtual envs, `runs/`, caches and files over 25 MiB; the job runs `python -m
ring_rl.cli train --config CONFIG ...` in it, on a cluster whose Python has ring-rl's
dependencies (or add them with --pip). The config is validated here first. Paths in it that
are relative (run.dir, data files, the model dir) are made absolute against this directory,
so the run reads and writes the same paths on the cluster as a local run would here (right
for a local or shared-filesystem cluster; --root names another base)."""
from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import time
from datetime import datetime
from pathlib import Path
from urllib.parse import urlparse

from ring_rl.rl.cluster import TOKEN_HELP, ClusterError, auth_headers, is_loopback, token_source

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the directory holding ring_rl/
EXCLUDES = [".git", "/runs/", "__pycache__", "*.pyc", "*.egg-info", ".pytest_cache", ".ruff_cache", "*.tmp-*"]
SKIP_DIRS = {".git", "runs", "__pycache__", ".pytest_cache", ".ruff_cache"}
MAX_FILE_MB = 25
STOP_GRACE_S = 300  # a stopped job's driver gets this long to finish its step and checkpoint


def api_address(arg: str | None) -> str:
    address = arg or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ClusterError("no cluster address: pass --address http://HOST:8265 or set RAY_API_SERVER_ADDRESS")
    return address if "://" in address else f"http://{address}"


def client(address: str):
    """A JobSubmissionClient with the token header when one applies; refusals explained."""
    import requests
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    headers = auth_headers(address)
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError as e:
        raise ClusterError(refusal(address, str(e), bool(headers))) from None
    except (ConnectionError, requests.RequestException) as e:
        raise ClusterError(f"cannot reach the Ray jobs API at {address} ({str(e).splitlines()[0][:200]}); "
                           "is the cluster up, and is this its dashboard address (port 8265 by default)?") from None


def refusal(address: str, message: str, sent: bool) -> str:
    if "Forbidden" in message or "invalid" in message.lower():
        return (f"the Ray cluster at {address} refused the token from {token_source()} (wrong token for "
                f"this cluster); {TOKEN_HELP}")
    why = "no token was sent" if not sent else "the token was not accepted"
    remote = not is_loopback(urlparse(address).hostname or "")
    return (f"the Ray cluster at {address} requires token authentication and {why}; {TOKEN_HELP}"
            + ("; to send ~/.ray/auth_token to a non-local address also set RAY_AUTH_MODE=token"
               if remote and not sent else ""))


def _call(address: str, fn):
    """Run fn() against the jobs API, turning auth refusals into the same clear message."""
    from ray.exceptions import AuthenticationError

    try:
        return fn()
    except AuthenticationError as e:
        raise ClusterError(refusal(address, str(e), True)) from None
    except RuntimeError as e:  # the SDK's "Request failed with status code ...", a job id not found, ...
        raise ClusterError(f"Ray jobs API at {address}: {str(e).strip().splitlines()[-1][:500]}") from None


# -- submit ------------------------------------------------------------------------------------
def submit(address: str, config: str, overrides: list[str], resume: bool = False, job_id: str | None = None,
           root: str | None = None, pip: list[str] | None = None, stop_grace_s: int = STOP_GRACE_S) -> str:
    from ring_rl.config import load_config

    config_path = Path(config).resolve()
    try:
        rel_config = config_path.relative_to(PACKAGE_ROOT)
    except ValueError:
        raise ClusterError(f"config {config}: must lie inside the shipped directory {PACKAGE_ROOT} "
                           "(copy it into configs/)") from None
    cfg = load_config(config_path, [*overrides, *(["run.resume=true"] if resume else [])])  # fails here, not on the cluster
    base = Path(root) if root else Path.cwd()
    pinned = absolute_paths(cfg, base)
    args = ["python", "-m", "ring_rl.cli", "train", "--config", str(rel_config), *overrides, *pinned]
    if resume:
        args.append("--resume")
    run_dir = Path(cfg.run.dir) if Path(cfg.run.dir).is_absolute() else base / cfg.run.dir
    job_id = job_id or f"ring-rl-{run_dir.name}-{datetime.now():%Y%m%d-%H%M%S}"
    runtime_env = {
        "working_dir": str(PACKAGE_ROOT),
        "excludes": EXCLUDES + not_shipped(PACKAGE_ROOT),
        "env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": str(stop_grace_s), "PYTHONUNBUFFERED": "1"},
    }
    if pip:
        runtime_env["pip"] = list(pip)
    jobs = client(address)
    logging.getLogger("ray").setLevel(logging.ERROR)  # Ray's per-file packaging chatter
    _call(address, lambda: jobs.submit_job(
        entrypoint=shlex.join(args), submission_id=job_id, runtime_env=runtime_env,
        metadata={"ring_rl_run_dir": str(run_dir), "ring_rl_config": str(rel_config)}))
    flag = f"--address {address}"
    print(f"submitted job {job_id} to {address}\n"
          f"  run directory: {run_dir}   (on the node running the job; metrics.jsonl, checkpoints/)\n"
          f"  report:        {run_dir / 'report.html'}   (written when the run ends)\n"
          f"  follow:        ring-rl logs --follow {job_id} {flag}\n"
          f"  status:        ring-rl status {job_id} {flag}\n"
          f"  stop:          ring-rl stop {job_id} {flag}   (checkpoints first; resume with --resume)")
    return job_id


def absolute_paths(cfg, base: Path) -> list[str]:
    """Overrides pinning every relative path of the config to `base` (JSON, which YAML reads)."""
    def pin(p: str) -> str:
        return p if os.path.isabs(p) else str(base / p)

    out = []
    if not os.path.isabs(cfg.run.dir):
        out.append(f"run.dir={pin(cfg.run.dir)}")
    for key in ("train_files", "test_files"):
        files = getattr(cfg.data, key)
        if any(not os.path.isabs(f) for f in files):
            out.append(f"data.{key}={json.dumps([pin(f) for f in files])}")
    name = cfg.model.name_or_path
    if not os.path.isabs(name) and ("/" in name or (base / name).exists()):  # a path, not a preset name
        out.append(f"model.name_or_path={pin(name)}")
    if cfg.sft.init_from and not os.path.isabs(cfg.sft.init_from):
        out.append(f"sft.init_from={pin(cfg.sft.init_from)}")
    return out


def not_shipped(root: Path) -> list[str]:
    """Exclude patterns for virtual environments (any folder with a pyvenv.cfg: the cluster
    has its own Python) and files over MAX_FILE_MB; the big files are named aloud."""
    venvs, big = [], []
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        if "pyvenv.cfg" in files:
            venvs.append("/" + str(here.relative_to(root)) + "/")
            dirs[:] = []
            continue
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        for f in files:
            try:
                if (here / f).stat().st_size > MAX_FILE_MB << 20:
                    big.append("/" + str((here / f).relative_to(root)))
            except OSError:
                pass
    if big:
        print(f"not shipped (over {MAX_FILE_MB} MiB): {', '.join(big)}", file=sys.stderr)
    return venvs + big


# -- status / logs / stop ----------------------------------------------------------------------
def status(address: str, job_id: str, wait: bool = False, poll_s: float = 2.0) -> str:
    jobs = client(address)
    info = _call(address, lambda: jobs.get_job_info(job_id))
    while wait and not info.status.is_terminal():
        time.sleep(poll_s)
        info = _call(address, lambda: jobs.get_job_info(job_id))
    run_dir = (info.metadata or {}).get("ring_rl_run_dir")
    print(f"{job_id}: {info.status.value}" + (f" ({info.message})" if info.message else ""))
    if run_dir:
        print(f"  run directory: {run_dir}" + _progress(Path(run_dir)))
    return info.status.value


def _progress(run_dir: Path) -> str:
    """`, step N done` when the run directory is visible from here."""
    metrics = run_dir / "metrics.jsonl"
    try:
        lines = [ln for ln in metrics.read_text().splitlines() if ln.strip()]
        return f", step {json.loads(lines[-1])['step']} done" if lines else ""
    except (OSError, ValueError, KeyError):
        return ""


def logs(address: str, job_id: str, follow: bool = False) -> None:
    import asyncio

    jobs = client(address)
    if not follow:
        print(_call(address, lambda: jobs.get_job_logs(job_id)), end="")
        return

    async def tail():
        async for chunk in jobs.tail_job_logs(job_id):
            print(chunk, end="", flush=True)

    _call(address, lambda: asyncio.run(tail()))


def stop(address: str, job_id: str, wait: bool = False) -> str:
    jobs = client(address)
    _call(address, lambda: jobs.stop_job(job_id))
    print(f"asked {job_id} to stop: the run finishes its current step, saves a checkpoint and ends "
          f"(continue it later with `ring-rl submit ... --resume`)")
    return status(address, job_id, wait=wait) if wait else "STOPPING"
