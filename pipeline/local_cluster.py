"""A local Ray cluster for the demo and the end-to-end tests, with Ray's token authentication on.

Ray 2.59+ turns token auth on for ``ray start --head``. Rather than switching it off, the local flow
keeps it: a random token is generated once into a file readable only by its owner (``.ray_token`` in
the checkout, ignored by git), and every Ray process and client started from here gets
``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH`` in its environment. Every port the cluster opens
(GCS, raylet, agents, Ray client server, metrics, dashboard, and the workers' gRPC servers) is bound to
127.0.0.1: see ``loopback_env``; so is the torch.distributed store of a training job on it (see
``pipeline.trainer.distributed``).

    python -m pipeline.local_cluster start [--num-cpus 2]   # prints the dashboard address
    python -m pipeline.local_cluster submit -- python pipeline/train.py --config configs/experiment/demo.yaml
    python -m pipeline.local_cluster stop
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from core.loopback import loopback_env

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TOKEN_FILE = REPO_ROOT / ".ray_token"
STATE_FILE_NAME = ".ray_local_cluster.json"
# The dashboard's answer while its job agent is not registered yet (Ray internal text: tests/test_private_apis.py).
AGENT_NOT_READY = "No available agent to submit job"


def ensure_token(path: Path = DEFAULT_TOKEN_FILE) -> Path:
    """Creates a random token file (mode 0600) if there is none; never prints the token."""
    if not path.exists() or not path.read_text().strip():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    os.chmod(path, 0o600)
    return path


def auth_env(token_file: Path = DEFAULT_TOKEN_FILE) -> dict[str, str]:
    """Environment variables every Ray process and client of this cluster needs."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports.

    All sockets stay bound until every port is chosen: closing each before asking for the next lets the
    kernel hand out the same port twice, and Ray refuses to start when two components share one.
    """
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


# Never part of a job's working_dir upload, whatever the uploaded folder's .gitignore and .rayignore say
# (the repository's .rayignore lists the same patterns, for a plain `ray job submit --working-dir .`):
# environment files, keys and certificates, credential and token files, local data, runs and MLflow stores.
UPLOAD_EXCLUDES = (
    ".env*", "*.pem", "*.key", "*.p12", "*.pfx", "*.jks", "*.keystore", "id_rsa*", "id_dsa*", "id_ecdsa*",
    "id_ed25519*", "credentials", ".git-credentials", ".netrc", ".pgpass", ".aws/", ".ssh/", ".kube/",
    ".ray_token", "*token*", "/data/", "/runs/", "/mlruns/", "/mlartifacts/", "*.db",
)


def working_dir_args(working_dir: Path, runtime_env: dict | None = None) -> list[str]:
    """The ``ray job submit`` options that ship ``working_dir`` without ``UPLOAD_EXCLUDES`` (passed as the
    job's runtime_env ``excludes``, so they hold even where the folder has no .rayignore) and with
    ``runtime_env``."""
    runtime_env = dict(runtime_env or {})
    runtime_env["excludes"] = [*UPLOAD_EXCLUDES, *runtime_env.get("excludes", [])]
    return ["--working-dir", str(working_dir), "--runtime-env-json", json.dumps(runtime_env)]


def ray_executable() -> str:
    candidate = Path(sys.executable).with_name("ray")
    return str(candidate) if candidate.exists() else "ray"


@dataclass
class LocalCluster:
    gcs_port: int
    dashboard_port: int
    token_file: Path
    pgid: int  # process group of the blocking `ray start`: stopping kills this cluster and nothing else

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def env(self) -> dict[str, str]:
        return {**os.environ, **auth_env(self.token_file), "RAY_ADDRESS": self.dashboard_url}

    def submit(self, entrypoint: list[str], working_dir: Path = REPO_ROOT, runtime_env: dict | None = None,
               submission_id: str | None = None, timeout: float | None = None,
               attempts: int = 20) -> subprocess.CompletedProcess:
        """``ray job submit`` (waits for the job and streams its logs); returns the finished process.

        Right after the head starts, its job agent may not be registered yet and the dashboard answers
        "No available agent to submit job, please try again later": then no job was created, so the
        submission is retried (a few seconds apart).
        """
        cmd = [ray_executable(), "job", "submit", "--address", self.dashboard_url,
               *working_dir_args(working_dir, runtime_env)]
        if submission_id:
            cmd += ["--submission-id", submission_id]
        cmd += ["--", *entrypoint]
        attempt = 0
        while True:
            attempt += 1
            proc = subprocess.Popen(cmd, env=self.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            tail: list[str] = []
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(line)
                tail = (tail + [line])[-20:]
            returncode = proc.wait(timeout=timeout)
            if returncode != 0 and any(AGENT_NOT_READY in line for line in tail) and attempt < attempts:
                time.sleep(3)
                continue
            return subprocess.CompletedProcess(cmd, returncode)

    def stop(self, grace_s: float = 15.0) -> None:
        """Stops this cluster only (``ray stop`` would stop every Ray on the machine)."""
        try:
            self._signal_group(grace_s)
        finally:
            # Ray records the last head it started here; a stale record makes a later `ray.init()`
            # try to join this dead cluster instead of starting its own. (The file is named in ray.init's
            # docstring; no public call clears it: tests/test_private_apis.py checks the path.)
            current = Path("/tmp/ray/ray_current_cluster")
            if current.exists() and current.read_text().strip().endswith(f":{self.gcs_port}"):
                current.unlink(missing_ok=True)

    def _signal_group(self, grace_s: float) -> None:
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.pgid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                try:
                    os.killpg(self.pgid, 0)
                except ProcessLookupError:
                    return
                time.sleep(0.2)


def start(num_cpus: int = 2, token_file: Path = DEFAULT_TOKEN_FILE, object_store_mb: int = 1024,
          temp_dir: str | None = None, timeout_s: float = 120.0) -> LocalCluster:
    """Starts a single-node head listening on 127.0.0.1 only, with token auth, and waits until jobs can
    be submitted.

    ``ray start --block`` runs in a new process group that owns every process of the cluster, so the
    cluster can be stopped without touching any other Ray on the machine.
    """
    gcs_port, dashboard_port, agent_http, agent_grpc, runtime_env, metrics, client = _free_ports(7)
    token_file = ensure_token(token_file)
    cmd = [
        ray_executable(), "start", "--head",
        "--node-ip-address", "127.0.0.1",
        "--port", str(gcs_port),
        "--dashboard-host", "127.0.0.1",
        "--dashboard-port", str(dashboard_port),
        # Free ports for the per-node agents too: their defaults (e.g. 52365) are taken by any other Ray
        # on the machine, and a head whose job agent cannot bind never accepts a job submission.
        "--dashboard-agent-listen-port", str(agent_http),
        "--dashboard-agent-grpc-port", str(agent_grpc),
        "--runtime-env-agent-port", str(runtime_env),
        "--metrics-export-port", str(metrics),
        "--ray-client-server-port", str(client),
        "--num-cpus", str(num_cpus),
        "--object-store-memory", str(object_store_mb * 2**20),
        "--disable-usage-stats",
        "--block",
    ]
    if temp_dir:
        cmd += ["--temp-dir", temp_dir]
    # Job entrypoints say `python`: make that this interpreter (the venv) on the cluster's PATH.
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, **auth_env(token_file), **loopback_env(),
           "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    log_path = Path(temp_dir or "/tmp") / f"ray-local-{gcs_port}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    cluster = LocalCluster(gcs_port, dashboard_port, token_file, pgid=proc.pid)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}; log: {log_path}\n{log_path.read_text()[-3000:]}")
        try:  # the job API answers (401 without a token) once the dashboard head is up
            urllib.request.urlopen(f"{cluster.dashboard_url}/api/version", timeout=2)
            return cluster
        except urllib.error.HTTPError:
            return cluster
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    cluster.stop()
    raise TimeoutError(f"Ray head did not come up within {timeout_s}s; log: {log_path}")


def _state_path() -> Path:
    return REPO_ROOT / STATE_FILE_NAME


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.local_cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    start_p = sub.add_parser("start", help="start a local head node with token auth")
    start_p.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2)
    start_p.add_argument("--object-store-mb", type=int, default=1024)
    sub.add_parser("stop", help="stop the local cluster")
    submit_p = sub.add_parser("submit", help="ray job submit to the local cluster (args after --)")
    submit_p.add_argument("entrypoint", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)

    if args.command == "start":
        cluster = start(args.num_cpus, object_store_mb=args.object_store_mb)
        _state_path().write_text(json.dumps({"gcs_port": cluster.gcs_port, "dashboard_port": cluster.dashboard_port,
                                             "token_file": str(cluster.token_file), "pgid": cluster.pgid}))
        print(f"Ray head at {cluster.address}, dashboard {cluster.dashboard_url} (token auth on, loopback only)")
        return 0
    if not _state_path().exists():
        print("no local cluster started from this checkout (python -m pipeline.local_cluster start)", file=sys.stderr)
        return 1
    state = json.loads(_state_path().read_text())
    cluster = LocalCluster(state["gcs_port"], state["dashboard_port"], Path(state["token_file"]), state["pgid"])
    if args.command == "stop":
        cluster.stop()
        _state_path().unlink(missing_ok=True)
        return 0
    entry = args.entrypoint[1:] if args.entrypoint[:1] == ["--"] else args.entrypoint
    if not entry:
        parser.error("submit needs an entrypoint after --")
    return cluster.submit(entry).returncode


if __name__ == "__main__":
    sys.exit(main())
