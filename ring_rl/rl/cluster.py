"""Ray token authentication on the client side, and a one-node cluster for trying submission.

The token is found the way Ray finds it (Ray's own loader): `RAY_AUTH_TOKEN`, else the file
named by `RAY_AUTH_TOKEN_PATH`, else `~/.ray/auth_token`. It is never printed.

`local_up` starts `ray start --head --block` in a session of its own, with token auth on and
every Ray server bound to 127.0.0.1, and records it in `~/.ring-rl/local-cluster.json`;
`local_down` stops exactly that cluster (never other Ray instances on the machine)."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

TOKEN_HELP = ("provide the cluster's token in RAY_AUTH_TOKEN, or in a file named by RAY_AUTH_TOKEN_PATH, "
              "or in ~/.ray/auth_token (`ring-rl cluster up --local` writes that file; on a remote "
              "cluster `ray get-auth-token` on the head prints it)")


class ClusterError(RuntimeError):
    """A cluster or authentication problem, with what to do about it."""


# -- the token --------------------------------------------------------------------------------
def token_source() -> str:
    """Where Ray would take the token from (a description; never the token)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return f"RAY_AUTH_TOKEN_PATH={os.environ['RAY_AUTH_TOKEN_PATH']}"
    return str(default_token_path())


def default_token_path() -> Path:
    return Path.home() / ".ray" / "auth_token"


def read_token() -> str | None:
    """The token Ray would use, or None when there is none."""
    from ray._raylet import AuthenticationTokenLoader
    from ray.exceptions import AuthenticationError

    loader = AuthenticationTokenLoader.instance()
    loader.reset_cache()  # the environment may have changed since the last read (tests, long-lived callers)
    try:
        if not loader.has_token(ignore_auth_mode=True):
            return None
        return loader.get_raw_token(ignore_auth_mode=True)
    except AuthenticationError:  # e.g. RAY_AUTH_TOKEN_PATH names a missing or empty file
        raise ClusterError(f"no readable token at {token_source()}; {TOKEN_HELP}") from None


def auth_headers(address: str) -> dict[str, str]:
    """The Authorization header for the jobs API at `address`, if a token should go there.

    RAY_AUTH_MODE=disabled sends none. A token named explicitly (RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH) or RAY_AUTH_MODE=token sends it anywhere; the default file
    ~/.ray/auth_token goes only to a loopback address unless RAY_AUTH_MODE=token, so a local
    token does not leak to another cluster."""
    mode = os.environ.get("RAY_AUTH_MODE", "").lower()
    if mode == "disabled":
        return {}
    explicit = bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"))
    host = urlparse(address if "://" in address else f"http://{address}").hostname or ""
    if not (mode == "token" or explicit or is_loopback(host)):
        return {}
    token = read_token()
    if token is None:
        if mode == "token":
            raise ClusterError(f"RAY_AUTH_MODE=token but no token found; {TOKEN_HELP}")
        return {}
    if address.startswith("http://") and not is_loopback(host):
        print(f"warning: sending the Ray token to {host} over plain http; prefer https or an SSH tunnel",
              file=sys.stderr)
    return {"Authorization": f"Bearer {token}"}


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def ensure_token_file() -> str:
    """Make sure the head finds a token: RAY_AUTH_TOKEN as it is, else the token file (made
    with a fresh 256-bit token if missing), readable by its owner only. Returns its source."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or default_token_path()).expanduser()
    if path.exists():
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            path.chmod(0o600)
            print(f"note: {path} was readable by others (mode {mode:o}); made it 0600", file=sys.stderr)
        if not path.read_text().strip():
            raise ClusterError(f"{path} is empty; remove it to have a new token generated, or {TOKEN_HELP}")
        return str(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never world-readable, not even briefly
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))  # what `ray get-auth-token --generate` writes
    print(f"generated a Ray auth token in {path} (mode 600)", file=sys.stderr)
    return str(path)


# -- the local cluster ------------------------------------------------------------------------
def state_file() -> Path:
    return Path(os.environ.get("RING_RL_STATE_DIR") or Path.home() / ".ring-rl") / "local-cluster.json"


def local_up(port: int = 6379, dashboard_port: int = 8265, num_cpus: int | None = None,
             num_gpus: int | None = None, timeout_s: float = 120.0) -> dict:
    """Start the one-node cluster and wait until its jobs API answers; returns its record."""
    state_path = state_file()
    if state_path.exists():
        old = json.loads(state_path.read_text())
        if _alive(old["pid"]):
            raise ClusterError(f"a local cluster is already up (jobs API {old['address']}, recorded in "
                               f"{state_path}); `ring-rl cluster down` stops it")
        state_path.unlink()
    for p in (port, dashboard_port):
        if not _port_free(p):
            raise ClusterError(f"port {p} on 127.0.0.1 is in use; pick others with --port/--dashboard-port")
    source = ensure_token_file()
    temp_dir = tempfile.mkdtemp(prefix="ring-rl-ray-", dir="/tmp")  # short: Ray's socket paths live here
    state_path.parent.mkdir(parents=True, exist_ok=True)
    log_path = state_path.with_name("local-cluster.log")
    ray_bin = Path(sys.executable).with_name("ray")
    cmd = [str(ray_bin) if ray_bin.exists() else (shutil.which("ray") or "ray"), "start", "--head", "--block", "--disable-usage-stats",
           f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
           f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
           f"--temp-dir={temp_dir}", f"--num-cpus={num_cpus or os.cpu_count()}"]
    if num_gpus is not None:
        cmd.append(f"--num-gpus={num_gpus}")
    env = dict(os.environ,
               RAY_AUTH_MODE="token",
               # Ray's single-node mode: the node IP is 127.0.0.1, so GCS, raylet, agents and
               # workers listen on loopback only (the dashboard via --dashboard-host).
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # `cluster down` stops at once
               RAY_JOB_STOP_WAIT_TIME_S="300",  # a stopped job's driver gets time to checkpoint
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    address = f"http://127.0.0.1:{dashboard_port}"
    record = {"pid": proc.pid, "address": address, "gcs": f"127.0.0.1:{port}", "temp_dir": temp_dir,
              "log": str(log_path), "token": source}
    state_path.write_text(json.dumps(record, indent=1))
    deadline = time.monotonic() + timeout_s
    while not _jobs_api_up(address):
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log_path.read_text()[-2000:]
            local_down(quiet=True)
            raise ClusterError(f"the Ray head did not come up (see {log_path}):\n{tail}")
        time.sleep(0.5)
    return record


def local_down(quiet: bool = False) -> int:
    """Stop the recorded cluster: SIGTERM to `ray start --block` (it stops its processes),
    then SIGKILL anything left of it: its session, and processes working in its temp dir
    (job drivers run in a session of their own). Returns the number of processes stopped."""
    state_path = state_file()
    if not state_path.exists():
        if not quiet:
            print(f"no local cluster recorded in {state_path}")
        return 0
    record = json.loads(state_path.read_text())
    import psutil

    def members() -> list:
        found = []
        for p in psutil.process_iter(["pid"]):
            try:
                if p.pid == os.getpid():
                    continue
                if os.getsid(p.pid) == record["pid"] or _works_in(p, record["temp_dir"]):
                    found.append(p)
            except (psutil.Error, ProcessLookupError, PermissionError):
                pass
        return found

    procs = members()
    if _alive(record["pid"]):
        os.kill(record["pid"], signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=30)
    for p in alive + members():
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(members(), timeout=10)
    shutil.rmtree(record["temp_dir"], ignore_errors=True)
    state_path.unlink()
    if not quiet:
        print(f"stopped the local Ray cluster at {record['address']} ({len(procs)} processes)")
    return len(procs)


def _works_in(p, temp_dir: str) -> bool:
    import psutil

    try:
        if p.cwd().startswith(temp_dir):
            return True
        return any(temp_dir in arg for arg in p.cmdline())
    except psutil.Error:
        return False


def _jobs_api_up(address: str) -> bool:
    import requests

    try:
        return requests.get(f"{address}/api/version", headers=auth_headers(address), timeout=2).ok
    except requests.RequestException:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    import psutil

    try:  # a zombie is dead
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
