"""`ring-rl cluster up --local`, `submit`, `logs`, `status`, `stop`, `cluster down` on a real
loopback Ray cluster with token authentication: the README's path, as a user runs it.

HOME is a temp dir, so the token file and the cluster record are the test's own; every
process of the cluster is gone at the end."""
from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys

import psutil
import pytest

from ring_rl.rl.metrics import read_metrics
from ring_rl.rl.run_state import CheckpointDirs
from tests.rl.tiny_run import CONFIG, ROOT, env, overrides, prepare, session_members, wait_for

pytestmark = pytest.mark.slow
AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home) -> dict:
    base = {k: v for k, v in env().items() if k not in AUTH_VARS}
    return {**base, "HOME": str(home)}


def _cli(*args: str, environ: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ring_rl.cli", *args], cwd=ROOT, env=environ, timeout=timeout,
                          capture_output=True, text=True)


def _cluster_processes(record: dict) -> list[psutil.Process]:
    """The head's session, and whatever works in its temp dir (job drivers have their own session)."""
    found = session_members(record["pid"])
    for p in psutil.process_iter():
        try:
            if p not in found and (p.cwd().startswith(record["temp_dir"])
                                   or any(record["temp_dir"] in a for a in p.cmdline())):
                found.append(p)
        except psutil.Error:
            pass
    return found


def test_submit_to_a_local_cluster_with_token_auth(tmp_path):
    prepared = prepare(tmp_path / "tiny")
    home = tmp_path / "home"
    home.mkdir()
    user = _env(home)
    port, dash = _free_port(), _free_port()
    address = f"http://127.0.0.1:{dash}"
    record = None
    try:
        # 4 CPUs offered: the two jobs below (2 actors each) run side by side.
        up = _cli("cluster", "up", "--local", f"--port={port}", f"--dashboard-port={dash}", "--num-cpus=4",
                  environ=user, timeout=180)
        assert up.returncode == 0, up.stdout + up.stderr
        record = json.loads((home / ".ring-rl/local-cluster.json").read_text())
        token_file = home / ".ray/auth_token"
        token = token_file.read_text().strip()
        assert len(token) == 64 and stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert address in up.stdout and token not in up.stdout + up.stderr

        # Bound to loopback only: no Ray process of this cluster listens on another address.
        listening = [c.laddr for p in _cluster_processes(record) for c in _connections(p) if c.status == "LISTEN"]
        assert listening and all(a.ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1") for a in listening), listening

        # Refused without the token, and with a wrong one, saying how to provide it.
        stranger = tmp_path / "stranger"
        stranger.mkdir()
        job_args = ["--config", str(CONFIG), *overrides(prepared, tmp_path / "run", 3, "run.checkpoint_every=1")]
        no_token = _cli("submit", "--address", address, *job_args, environ=_env(stranger))
        assert no_token.returncode == 2
        assert "requires token authentication and no token was sent" in no_token.stderr
        assert "RAY_AUTH_TOKEN" in no_token.stderr and "~/.ray/auth_token" in no_token.stderr
        wrong = _cli("status", "nope", "--address", address, environ={**_env(stranger), "RAY_AUTH_TOKEN": "0" * 64})
        assert wrong.returncode == 2 and "refused the token from RAY_AUTH_TOKEN (wrong token" in wrong.stderr

        # A 3-step run: submit, follow its logs to the end, then its status and run directory.
        # Beside it a long run, stopped below.
        sub = _cli("submit", "--address", address, "--job-id", "tiny-3", *job_args, environ=user)
        assert sub.returncode == 0, sub.stdout + sub.stderr
        long_dir = tmp_path / "long"
        long_args = ["--config", str(CONFIG), *overrides(prepared, long_dir, 200, "run.checkpoint_every=100")]
        assert _cli("submit", "--address", address, "--job-id", "tiny-long", *long_args, environ=user).returncode == 0
        run_dir = tmp_path / "run"
        assert f"submitted job tiny-3 to {address}" in sub.stdout and f"run directory: {run_dir}" in sub.stdout
        assert str(run_dir / "report.html") in sub.stdout and token not in sub.stdout + sub.stderr
        follow = _cli("logs", "--follow", "tiny-3", "--address", address, environ=user, timeout=400)
        assert follow.returncode == 0, follow.stderr
        for step in (1, 2, 3):
            assert f"step {step}/3: reward" in follow.stdout, follow.stdout[-3000:]
        assert "report:" in follow.stdout
        status = _cli("status", "tiny-3", "--wait", "--address", address, environ=user)
        assert status.returncode == 0 and "tiny-3: SUCCEEDED" in status.stdout, status.stdout + status.stderr
        assert f"run directory: {run_dir}, step 3 done" in status.stdout
        assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]
        ckpts = CheckpointDirs(run_dir)
        assert ckpts.latest().name == "step_000003" and CheckpointDirs.verify(ckpts.latest())["step"] == 3
        assert (run_dir / "report.html").exists()

        # `ring-rl stop` mid-run: the job ends STOPPED with a checkpoint of its last step.
        wait_for(lambda: (long_dir / "metrics.jsonl").exists() and read_metrics(long_dir), 300, "a first step")
        stop = _cli("stop", "tiny-long", "--wait", "--address", address, environ=user)
        assert stop.returncode == 0 and "tiny-long: STOPPED" in stop.stdout, stop.stdout + stop.stderr
        last = read_metrics(long_dir)[-1]["step"]
        newest = CheckpointDirs(long_dir).latest()
        assert 1 <= last < 200 and newest.name == f"step_{last:06d}"
        assert CheckpointDirs.verify(newest)["stream"]["index"] == 2 * last
        logs = _cli("logs", "tiny-long", "--address", address, environ=user)
        assert f"stopped after step {last} of 200; checkpoint {newest}" in logs.stdout

        down = _cli("cluster", "down", environ=user)
        assert down.returncode == 0 and "stopped the local Ray cluster" in down.stdout, down.stderr
        assert not (home / ".ring-rl/local-cluster.json").exists()
        assert not _cluster_processes(record), "Ray processes outlived `ring-rl cluster down`"
        assert not os.path.exists(record["temp_dir"])
        record = None
    finally:
        if record is not None:  # the test failed midway: leave nothing running
            _cli("cluster", "down", environ=user)
            for p in _cluster_processes(record):
                p.kill()


def _connections(p: psutil.Process) -> list:
    try:
        return p.net_connections(kind="inet")
    except psutil.Error:
        return []


# -- the client side without a cluster: which token goes where, what is shipped -----------------
@pytest.fixture
def token_home(tmp_path, monkeypatch):
    for var in AUTH_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray/auth_token").write_text("a" * 64)
    return tmp_path


@pytest.mark.parametrize("address, env_vars, sent", [
    ("http://127.0.0.1:8265", {}, True),                      # the default file, to loopback
    ("http://localhost:8265", {}, True),
    ("http://10.0.0.5:8265", {}, False),                      # ...but not to another host
    ("http://10.0.0.5:8265", {"RAY_AUTH_MODE": "token"}, True),
    ("http://10.0.0.5:8265", {"RAY_AUTH_TOKEN": "b" * 64}, True),  # named explicitly: sent anywhere
    ("http://127.0.0.1:8265", {"RAY_AUTH_MODE": "disabled"}, False),
])
def test_which_token_goes_where(token_home, monkeypatch, address, env_vars, sent):
    from ring_rl.rl.cluster import auth_headers

    for k, v in env_vars.items():
        monkeypatch.setenv(k, v)
    expected = env_vars.get("RAY_AUTH_TOKEN", "a" * 64)
    assert auth_headers(address) == ({"Authorization": f"Bearer {expected}"} if sent else {})


def test_token_path_and_missing_token_errors(token_home, monkeypatch):
    from ring_rl.rl.cluster import ClusterError, auth_headers

    other = token_home / "other-token"
    other.write_text("c" * 64 + "\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(other))
    assert auth_headers("https://ray.example:8265") == {"Authorization": f"Bearer {'c' * 64}"}
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_home / "nope"))
    with pytest.raises(ClusterError, match="no readable token at RAY_AUTH_TOKEN_PATH=.*nope"):
        auth_headers("http://127.0.0.1:8265")
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    (token_home / ".ray/auth_token").unlink()
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    with pytest.raises(ClusterError, match="RAY_AUTH_MODE=token but no token found; provide"):
        auth_headers("http://127.0.0.1:8265")


def test_token_file_is_made_private(tmp_path, monkeypatch):
    from ring_rl.rl.cluster import ensure_token_file

    for var in AUTH_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    path = tmp_path / ".ray/auth_token"
    assert ensure_token_file() == str(path)
    first = path.read_text()
    assert len(first) == 64 and int(first, 16) and stat.S_IMODE(path.stat().st_mode) == 0o600
    path.chmod(0o644)  # e.g. written by `ray get-auth-token --generate` under a umask of 022
    assert ensure_token_file() == str(path) and path.read_text() == first
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_relative_paths_are_pinned_and_venvs_not_shipped(tmp_path):
    from ring_rl.config import load_config
    from ring_rl.rl.submit import absolute_paths, not_shipped

    cfg = load_config(CONFIG, ["run.dir=runs/x", "data.builtin=null", "data.train_files=[/abs/train.jsonl]",
                               "data.test_files=[data/t.jsonl]"])
    pinned = absolute_paths(cfg, tmp_path)
    assert f"run.dir={tmp_path}/runs/x" in pinned
    assert f'data.test_files=["{tmp_path}/data/t.jsonl"]' in pinned
    assert f"model.name_or_path={tmp_path}/runs/tiny-arith-sft" in pinned
    assert not any(p.startswith("data.train_files") for p in pinned)  # already absolute
    assert absolute_paths(load_config(CONFIG, ["model.name_or_path=tiny", "run.dir=/r", "data.builtin=null",
                                               "data.train_files=[/a]", "data.test_files=[/b]"]), tmp_path) == []

    (tmp_path / "env/bin").mkdir(parents=True)
    (tmp_path / "env/pyvenv.cfg").write_text("home = /usr/bin\n")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg/big.bin").write_bytes(b"\0" * (26 << 20))
    (tmp_path / "pkg/small.py").write_text("x = 1\n")
    assert not_shipped(tmp_path) == ["/env/", "/pkg/big.bin"]
