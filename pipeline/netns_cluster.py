"""A multi-node Ray cluster on one machine: one Linux network namespace per node, for tests and for people.

The shape of the KubeRay RayJob (k8s/base/ray-train.yaml) on one machine: a head that runs no tasks
(``--num-cpus 0``) and serves the dashboard, a GPU-worker group (workers 1..K, ``--gpu-workers K``,
default 1, advertise ``mvit_gpu_node``, the custom resource the job's driver is placed with) and a
CPU-worker group (the other workers advertise ``mvit_cpu_node``, a marker this cluster adds: the
manifests' cpu-workers advertise no custom resource), one CPU each by default, no GPUs. Token auth is
on, as in local_cluster (a random token in a 0600 file, every Ray process and client gets
``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH``).

With ``--s3`` the cluster also has an S3 node: a moto server at ``http://10.213.0.253:5000`` in its own
network and PID namespace, a bucket (``mvit``) created on it, and fresh random dummy credentials (a 0600
file in the run dir) that every Ray node and every ``exec`` client gets in its environment with the
endpoint (``AWS_ENDPOINT_URL``), as the KubeRay manifests give every pod the S3 Secret: never through a
job's runtime_env, which Ray writes to its runtime_env_agent.log in clear and shows in ``ray job list``.

Everything lives inside namespaces this module creates, named ``mvnc-XXXXXX-*`` (a fresh prefix per
cluster): a bridge namespace holding the Linux bridge, one namespace per node (head, w1..wN, s3) and a client
namespace, each joined to the bridge by a veth pair created directly inside the namespaces, on the
private network ``10.213.0.0/24`` that exists only there. The machine's own namespace gets no address,
link or route on it, and the namespaces have no route anywhere else: nothing a node opens (even on
0.0.0.0) is reachable from outside, and nothing in them can reach out. Clients (``ray job submit``,
``ray status``, drivers) run in the client namespace (``exec``). Each node runs in its own PID
namespace with its own /proc and its own ``--temp-dir``, so Ray, which finds "its" local raylet by
scanning processes, sees only its node, as on separate machines; nodes never use core/loopback.py's
single-machine mode (it forbids other nodes joining). The namespaces share the machine's host name, which
/etc/hosts resolves to 127.0.0.1, so every node gets ``GLOO_SOCKET_IFNAME=eth0`` (else torch.distributed's
gloo would advertise loopback to the other ranks).

    python -m pipeline.netns_cluster start --workers 2       # or scripts/netns-cluster start
    python -m pipeline.netns_cluster start --workers 4 --gpu-workers 2 --s3   # the job across nodes (docs/cluster.md)
    python -m pipeline.netns_cluster status
    python -m pipeline.netns_cluster exec -- ray status
    python -m pipeline.netns_cluster exec -- ray job submit --working-dir . -- python pipeline/train.py ...
    python -m pipeline.netns_cluster where SUBMISSION_ID      # the node each actor and task of that job ran on
    python -m pipeline.netns_cluster kill w1                  # faults: SIGKILL a node (also term, restart, link)
    python -m pipeline.netns_cluster stop                     # every process by pid, then the namespaces

Needs root (network namespaces, veth links, a bridge), iproute2's ``ip`` and util-linux's ``unshare``.
The state (names, addresses, pids, token path, dashboard URL) is a JSON file (``--state``, default
``.ray_netns_cluster.json`` in the checkout), so ``stop``/``status``/``exec`` work from any process.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from core.loopback import LOOPBACK_ENV
from pipeline.local_cluster import AGENT_NOT_READY, REPO_ROOT, auth_env, ensure_token, ray_executable, working_dir_args

DEFAULT_STATE_FILE = REPO_ROOT / ".ray_netns_cluster.json"
STATE_ENV = "MVIT_NETNS_STATE"  # overrides the default state file
NAME_PREFIX = "mvnc-"  # every namespace of every such cluster: mvnc-<6 hex>-<role>
_PREFIX_RE = re.compile(r"^mvnc-[0-9a-f]{6}$")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
SUBNET = "10.213.0"  # the /24 that exists only inside a cluster's namespaces (each cluster has its own bridge)
HEAD_HOST, S3_HOST, CLIENT_HOST, MAX_WORKERS = 1, 253, 254, 200  # head .1, worker i .(1+i), S3 .253, client .254
GCS_PORT, DASHBOARD_PORT, AGENT_PORT, CLIENT_SERVER_PORT = 6379, 8265, 52365, 10001  # Ray's defaults
GPU_GROUP, GPU_RESOURCE = "gpu-workers", "mvit_gpu_node"  # k8s/base/ray-train.yaml's GPU worker group
CPU_GROUP, CPU_RESOURCE = "cpu-workers", "mvit_cpu_node"  # ... and its CPU group (resource: ours)
S3_GROUP, S3_PORT, DEFAULT_BUCKET = "s3", 5000, "mvit"  # the optional S3 node: moto on 10.213.0.253:5000
S3_REGION = "us-east-1"
# The cluster's files: token, logs, each node's Ray temp dir. Short on purpose: Ray's Unix sockets live
# under <temp dir>/session_<date>_<pid>/sockets/ and a socket path may not exceed 107 bytes.
RUN_ROOT = Path("/tmp")
# Inherited settings that would point a node or client at another cluster or token, or put a node in
# single-machine mode (which refuses other nodes).
_DROPPED_ENV = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE",
                *LOOPBACK_ENV)
# With an S3 node, inherited AWS settings that would point a node or client at another account, role,
# endpoint or region than the cluster's own (s3_env sets the rest).
_DROPPED_AWS_ENV = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION",
                    "AWS_ROLE_ARN", "AWS_ROLE_SESSION_NAME", "AWS_WEB_IDENTITY_TOKEN_FILE",
                    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                    "AWS_CONTAINER_AUTHORIZATION_TOKEN", "AWS_CA_BUNDLE")


class NetnsError(RuntimeError):
    """The namespace cluster cannot be built or used; the message is one line."""


@dataclass
class Node:
    """One namespace of the cluster: a Ray node (head, worker), the S3 node or the client namespace."""

    name: str  # head, w1, w2, ..., s3, client
    namespace: str
    ip: str
    group: str  # head, gpu-workers, cpu-workers, s3, client
    num_cpus: int = 0
    resources: dict[str, float] = field(default_factory=dict)
    pid: int | None = None  # its `ray start --block` / `moto_server` (inside `unshare`); None: not started, client
    temp_dir: str | None = None  # its Ray --temp-dir
    log: str | None = None  # stdout/stderr of its `ray start` / `moto_server`
    object_store_mb: int | None = None  # its object store (a Ray node), kept for restart_node
    env: dict[str, str] = field(default_factory=dict)  # extra environment of its Ray processes (start's node_env)


@dataclass
class NetnsCluster:
    """A Ray head and N workers, each in its own network namespace on a private bridge; see the module doc."""

    prefix: str  # mvnc-<6 hex>
    run_dir: Path  # token, logs, the nodes' Ray temp dirs
    token_file: Path
    state_file: Path
    nodes: list[Node]  # head first, then w1..wN (the Ray nodes)
    client: Node
    status: str = "starting"  # starting (possibly half-built) | running
    s3: Node | None = None  # the optional S3 node (moto), no Ray process
    s3_bucket: str | None = None  # the bucket `start` created on it
    _procs: dict[str, subprocess.Popen] = field(default_factory=dict, repr=False, compare=False)

    @property
    def bridge_namespace(self) -> str:
        return f"{self.prefix}-br"

    @property
    def namespaces(self) -> list[str]:
        """Every namespace of the cluster, the bridge's last (what the others hang on)."""
        return [n.namespace for n in self.members] + [self.bridge_namespace]

    @property
    def members(self) -> list[Node]:
        """Every namespace's node: the Ray nodes, the S3 node (if any), the client."""
        return [*self.nodes, *([self.s3] if self.s3 else []), self.client]

    def node(self, name: str) -> Node:
        return next(n for n in self.members if n.name == name)

    @property
    def head(self) -> Node:
        return self.nodes[0]

    @property
    def workers(self) -> list[Node]:
        return self.nodes[1:]

    @property
    def gcs_address(self) -> str:
        return f"{self.head.ip}:{GCS_PORT}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.head.ip}:{DASHBOARD_PORT}"

    @property
    def s3_endpoint(self) -> str | None:
        """``http://10.213.0.253:5000`` with an S3 node, else None."""
        return f"http://{self.s3.ip}:{S3_PORT}" if self.s3 else None

    @property
    def s3_credentials_file(self) -> Path:
        return self.run_dir / "s3-credentials.json"

    def s3_env(self) -> dict[str, str]:
        """The S3 settings every Ray node and client of a cluster with an S3 node gets: the endpoint
        (``AWS_ENDPOINT_URL``, which core/s3.py and botocore read), the region, the cluster's random dummy
        credentials (moto accepts any), no AWS config files and no instance metadata lookups; empty without
        an S3 node. As in k8s/base/ray-train.yaml, these reach the Ray processes as the nodes' environment,
        never through a job's runtime_env (which Ray stores, shows in ``ray job list`` and the dashboard, and
        writes to its logs)."""
        if self.s3 is None:
            return {}
        env = {"AWS_ENDPOINT_URL": str(self.s3_endpoint), "AWS_DEFAULT_REGION": S3_REGION,
               "AWS_CONFIG_FILE": "/nonexistent/aws-config",
               "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials", "AWS_EC2_METADATA_DISABLED": "true"}
        if self.s3_credentials_file.exists():  # not yet (or no longer) on a half-built (half-stopped) cluster
            keys = json.loads(self.s3_credentials_file.read_text())
            env.update(AWS_ACCESS_KEY_ID=keys["access_key_id"], AWS_SECRET_ACCESS_KEY=keys["secret_access_key"])
        return env

    def _base_env(self) -> dict[str, str]:
        """This process's environment without the settings that would point elsewhere, plus the S3 node's."""
        dropped = (*_DROPPED_ENV, *(_DROPPED_AWS_ENV if self.s3 else ()))
        env = {k: v for k, v in os.environ.items() if k not in dropped}
        env.update(self.s3_env(), PATH=_venv_path())
        return env

    # ---- clients -------------------------------------------------------------------------------------

    def client_env(self, auth: bool = True) -> dict[str, str]:
        """Environment of a client in the client namespace: ``ray status`` and ``ray.init`` read RAY_ADDRESS
        (the GCS), ``ray job ...`` RAY_API_SERVER_ADDRESS (the dashboard); the token unless ``auth=False``;
        with an S3 node, its endpoint and credentials (``s3_env``)."""
        env = self._base_env()
        env.update(RAY_ADDRESS=self.gcs_address, RAY_API_SERVER_ADDRESS=self.dashboard_url)
        if auth:
            env.update(auth_env(self.token_file))
        return env

    def exec(self, cmd: Sequence[str], *, auth: bool = True, env: dict[str, str] | None = None,
             **kwargs) -> subprocess.CompletedProcess:
        """Runs ``cmd`` in the client namespace (``subprocess.run`` keyword arguments pass through)."""
        full_env = {**self.client_env(auth), **(env or {})}
        return subprocess.run(self.in_client(cmd), env=full_env, **kwargs)

    def in_client(self, cmd: Sequence[str]) -> list[str]:
        """``cmd`` as run in the client namespace (with ``client_env()`` as its environment)."""
        return ["ip", "netns", "exec", self.client.namespace, *cmd]

    def submit_command(self, entrypoint: Sequence[str], working_dir: Path = REPO_ROOT,
                       extra_args: Sequence[str] = ()) -> list[str]:
        """The ``ray job submit`` command line for ``entrypoint`` on this cluster (run it with ``exec`` or
        ``in_client``): the one place that says how jobs reach the head."""
        return [ray_executable(), "job", "submit", "--address", self.dashboard_url, *working_dir_args(working_dir),
                *extra_args, "--", *entrypoint]

    def submit(self, entrypoint: Sequence[str], working_dir: Path = REPO_ROOT, extra_args: Sequence[str] = (),
               timeout: float | None = None, attempts: int = 10) -> subprocess.CompletedProcess:
        """``ray job submit`` from the client namespace (waits for the job); returns it with its output.

        Retried while the dashboard answers that its job agent is not registered yet (no job was created)."""
        cmd = self.submit_command(entrypoint, working_dir, extra_args)
        for attempt in range(1, attempts + 1):
            done = self.exec(cmd, capture_output=True, text=True, timeout=timeout)
            if done.returncode == 0 or AGENT_NOT_READY not in done.stdout + done.stderr or attempt == attempts:
                return done
            time.sleep(3)
        raise AssertionError("unreachable")

    def probe(self, timeout_s: float = 20.0) -> dict:
        """What the head's dashboard says, asked from the client namespace: ``{"nodes": [...] | None,
        "agent": bool, "error": str | None}``; each node as Ray's state API lists it (node_id, node_ip,
        is_head_node, state, resources_total)."""
        cmd = [sys.executable, "-m", "pipeline.netns_cluster", "_probe", "--dashboard", self.dashboard_url,
               "--agent", f"{self.head.ip}:{AGENT_PORT}"]
        try:
            done = subprocess.run(["ip", "netns", "exec", self.client.namespace, *cmd], cwd=REPO_ROOT,
                                  env=self.client_env(), capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"nodes": None, "agent": False, "error": f"no answer within {timeout_s}s"}
        if done.returncode != 0:
            return {"nodes": None, "agent": False, "error": _last_line(done.stderr) or f"probe exited {done.returncode}"}
        lines = done.stdout.strip().splitlines()
        return json.loads(lines[-1]) if lines else {"nodes": None, "agent": False, "error": "probe printed nothing"}

    def alive_nodes(self) -> list[dict]:
        return [n for n in self.probe().get("nodes") or [] if n.get("state") == "ALIVE"]

    def where(self, submission_id: str, timeout_s: float = 60.0) -> dict:
        """Where a submitted job's actors and tasks ran, as Ray's state API recorded it (asked from the client
        namespace): ``{"job_ids": [...], "actors": [...], "tasks": [...]}``, each actor ``{"class_name",
        "state", "node_ip", "node"}`` and each task ``{"name", "state", "node_ip", "node"}``, ``node`` being
        this cluster's name for it (head, w1, ...). Finished tasks and dead actors are kept by Ray (up to its
        limits), so this works after the job ended."""
        cmd = [sys.executable, "-m", "pipeline.netns_cluster", "_where", "--dashboard", self.dashboard_url,
               submission_id]
        done = subprocess.run(["ip", "netns", "exec", self.client.namespace, *cmd], cwd=REPO_ROOT,
                              env=self.client_env(), capture_output=True, text=True, timeout=timeout_s)
        lines = done.stdout.strip().splitlines()
        if done.returncode != 0 or not lines:
            raise NetnsError(f"cannot list where job {submission_id} ran: {_last_line(done.stderr) or 'no answer'}")
        found = json.loads(lines[-1])
        names = {n.ip: n.name for n in self.nodes}
        for row in (*found["actors"], *found["tasks"]):
            row["node"] = names.get(row["node_ip"])
        return found

    # ---- state ---------------------------------------------------------------------------------------

    def to_json(self) -> dict:
        return {"prefix": self.prefix, "status": self.status, "run_dir": str(self.run_dir),
                "token_file": str(self.token_file), "state_file": str(self.state_file),
                "subnet": f"{SUBNET}.0/24", "bridge_namespace": self.bridge_namespace,
                "gcs_address": self.gcs_address, "dashboard_url": self.dashboard_url,
                "nodes": [asdict(n) for n in self.nodes], "client": asdict(self.client),
                "s3": asdict(self.s3) if self.s3 else None, "s3_endpoint": self.s3_endpoint,
                "s3_bucket": self.s3_bucket}

    @classmethod
    def from_json(cls, data: dict) -> NetnsCluster:
        return cls(prefix=data["prefix"], run_dir=Path(data["run_dir"]), token_file=Path(data["token_file"]),
                   state_file=Path(data["state_file"]), nodes=[Node(**n) for n in data["nodes"]],
                   client=Node(**data["client"]), status=data.get("status", "starting"),
                   s3=Node(**data["s3"]) if data.get("s3") else None, s3_bucket=data.get("s3_bucket"))

    def save(self) -> None:
        """Writes the state file atomically (a reader never sees half of it)."""
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self.to_json(), f, indent=1)
        os.replace(tmp, self.state_file)

    # ---- building ------------------------------------------------------------------------------------

    def build_network(self) -> None:
        """Bridge namespace with bridge ``br0``; each node's and the client's namespace joined to it by a veth
        pair (``v-<name>`` on the bridge, ``eth0`` inside) created directly inside the namespaces, so the
        machine's own namespace never holds a link of the cluster. Saves the state before each step."""
        self.save()
        br = self.bridge_namespace
        _add_namespace(br)
        _ip("-n", br, "link", "add", "br0", "type", "bridge")
        _ip("-n", br, "link", "set", "br0", "up")
        for node in self.members:
            _add_namespace(node.namespace)
            _ip("-n", node.namespace, "link", "set", "lo", "up")
            port = f"v-{node.name}"
            _ip("-n", br, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", node.namespace)
            _ip("-n", br, "link", "set", port, "master", "br0", "up")
            _ip("-n", node.namespace, "addr", "add", f"{node.ip}/24", "dev", "eth0")
            _ip("-n", node.namespace, "link", "set", "eth0", "up")

    def start_node(self, node: Node, object_store_mb: int, append_log: bool = False) -> None:
        """``ray start --block`` for ``node`` inside its network namespace and a fresh PID namespace (own /proc)."""
        node.temp_dir = str(self.run_dir / node.name)
        node.log = str(self.run_dir / f"{node.name}.log")
        node.object_store_mb = object_store_mb
        Path(node.temp_dir).mkdir(parents=True, exist_ok=True)
        cmd = [ray_executable(), "start", "--node-ip-address", node.ip, "--num-cpus", str(node.num_cpus),
               "--num-gpus", "0", "--object-store-memory", str(object_store_mb * 2**20), "--temp-dir", node.temp_dir,
               "--dashboard-agent-listen-port", str(AGENT_PORT), "--disable-usage-stats", "--block"]
        if node is self.head:
            cmd += ["--head", "--port", str(GCS_PORT), "--dashboard-host", node.ip, "--dashboard-port",
                    str(DASHBOARD_PORT), "--ray-client-server-port", str(CLIENT_SERVER_PORT)]
        else:
            cmd += ["--address", self.gcs_address]
        if node.resources:
            cmd += ["--resources", json.dumps(node.resources)]
        # job entrypoints say `python`: this interpreter (the venv) comes first on every node's PATH (_base_env);
        # with an S3 node, every Ray process of the node (drivers, tasks, actors) inherits its settings
        # GLOO_SOCKET_IFNAME: the namespaces share the machine's host name and /etc/hosts, where it resolves
        # to 127.0.0.1, so gloo (torch.distributed on CPU) would advertise loopback to the other ranks; each
        # node's one interface to the others is eth0 (on real machines the host name resolves to their address)
        env = {**self._base_env(), **auth_env(self.token_file), "RAY_USAGE_STATS_ENABLED": "0",
               "GLOO_SOCKET_IFNAME": "eth0", **node.env}
        self._spawn(node, cmd, env, cwd=node.temp_dir, append_log=append_log)

    def _spawn(self, node: Node, cmd: Sequence[str], env: dict[str, str], cwd: str | Path,
               append_log: bool = False) -> None:
        """``cmd`` inside ``node``'s network namespace and a fresh PID namespace (own /proc), output to its log."""
        wrapped = ["ip", "netns", "exec", node.namespace, "unshare", "--pid", "--fork", "--mount-proc", *cmd]
        with open(str(node.log), "a" if append_log else "w") as log:
            proc = subprocess.Popen(wrapped, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self._procs[node.name] = proc
        node.pid = proc.pid
        self.save()

    def start_s3(self, bucket: str, timeout_s: float) -> None:
        """The S3 node: a moto server on ``10.213.0.253:5000`` in its own network and PID namespace (its
        objects live in its memory, gone with it), fresh random dummy credentials in a 0600 file, and
        ``bucket`` created through it from the client namespace (which also proves it answers)."""
        assert self.s3 is not None
        keys = {"access_key_id": "MVNC" + secrets.token_hex(8).upper(), "secret_access_key": secrets.token_hex(20)}
        fd = os.open(self.s3_credentials_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(keys, f)
        self.s3.log = str(self.run_dir / "s3.log")
        env = {"PATH": _venv_path(), "HOME": str(self.run_dir), "LANG": os.environ.get("LANG", "C.UTF-8")}
        self._spawn(self.s3, [str(Path(sys.executable).with_name("moto_server")), "-H", self.s3.ip, "-p",
                              str(S3_PORT)], env, cwd=self.run_dir)
        deadline = time.monotonic() + timeout_s
        while True:
            proc = self._procs[self.s3.name]
            if proc.poll() is not None:
                raise NetnsError(f"moto_server on {self.s3.ip} exited with {proc.returncode}; log {self.s3.log}:\n"
                                 f"{Path(self.s3.log).read_text()[-2000:]}")
            done = self.exec([sys.executable, "-c", _MAKE_BUCKET, bucket], auth=False, capture_output=True, text=True,
                             timeout=60)
            if done.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise NetnsError(f"the S3 node {self.s3_endpoint} did not create bucket {bucket!r} within "
                                 f"{timeout_s:.0f}s: {_last_line(done.stderr)}; log {self.s3.log}")
            time.sleep(0.5)
        self.s3_bucket = bucket
        self.save()

    def wait_ready(self, count: int, timeout_s: float, need_agent: bool = False,
                   worker_restarts: int = 0) -> list[dict]:
        """Waits until ``count`` nodes are alive (and the head's job agent listens); fails early, with the log's
        tail, when a node's ``ray start`` exits, except that a worker's is started again, ``worker_restarts``
        times in all (on a loaded machine Ray 2.60's ``ray start`` can abort at startup: "The current node
        timed out during startup", or its raylet's wait for the dashboard agent's port file)."""
        deadline = time.monotonic() + timeout_s
        last: dict = {}
        while time.monotonic() < deadline:
            for name, proc in list(self._procs.items()):
                if proc.poll() is not None:
                    node = self.node(name)
                    if worker_restarts > 0 and node in self.workers:
                        worker_restarts -= 1
                        self.wait_node_gone(name, timeout_s=30)
                        self.start_node(node, node.object_store_mb or 512, append_log=True)
                        continue
                    tail = Path(node.log).read_text()[-2000:] if node.log and Path(node.log).exists() else ""
                    what = "moto_server" if node is self.s3 else "ray start"
                    raise NetnsError(f"{what} on {name} ({node.ip}) exited with {proc.returncode}; log {node.log}:\n"
                                     f"{tail}")
            last = self.probe()
            alive = [n for n in last.get("nodes") or [] if n.get("state") == "ALIVE"]
            if len(alive) >= count and (last.get("agent") or not need_agent):
                return alive
            time.sleep(1.0)
        raise NetnsError(f"the cluster {self.prefix} did not have {count} alive nodes within {timeout_s:.0f}s "
                         f"(last answer: {last.get('error') or len(last.get('nodes') or [])} nodes); logs in {self.run_dir}")

    # ---- faults: a node lost, drained, brought back ----------------------------------------------------

    def init_pid(self, name: str) -> int | None:
        """The pid, as this machine sees it, of ``name``'s first process inside its own PID namespace (its
        ``ray start --block``, or ``moto_server``): the node's PID 1, the ``unshare --fork`` child of its
        recorded pid. None when the node does not run."""
        node = self.node(name)
        if not node.pid or not _alive(node.pid):
            return None
        try:
            children = Path(f"/proc/{node.pid}/task/{node.pid}/children").read_text().split()
        except OSError:
            return None
        alive = [int(c) for c in children if _alive(int(c))]
        return alive[0] if alive else None

    def node_pids(self, name: str) -> list[int]:
        """Every process in ``name``'s network namespace (what ``ip netns pids`` lists)."""
        return sorted(namespace_pids([self.node(name).namespace]))

    def signal_node(self, name: str, sig: int) -> int:
        """Sends ``sig`` to ``name``'s PID 1 (``ray start --block``), as Kubernetes signals a pod's main
        process; returns its pid. SIGTERM makes Ray 2.60's ``ray start`` drain its node (reason PREEMPTION,
        deadline ``RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S`` ahead: see ``start(node_env=...)``), then kill
        its processes and exit; SIGKILL ends every process of the node at once (``kill_node``)."""
        pid = self.init_pid(name)
        if pid is None:
            raise NetnsError(f"node {name} does not run (no process in its PID namespace)")
        os.kill(pid, sig)
        return pid

    def wait_node_gone(self, name: str, timeout_s: float = 60.0) -> float:
        """Waits until no process is left in ``name``'s namespace and reaps its ``unshare``; returns the
        seconds waited. The namespace and its link stay: ``restart_node`` starts the node again."""
        started = time.monotonic()
        while self.node_pids(name):
            if time.monotonic() - started > timeout_s:
                raise NetnsError(f"node {name} still has processes {self.node_pids(name)} after {timeout_s:.0f}s")
            time.sleep(0.1)
        proc = self._procs.pop(name, None)
        if proc is not None:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        return time.monotonic() - started

    def kill_node(self, name: str, timeout_s: float = 30.0) -> int:
        """Loses node ``name`` as a machine loses power: SIGKILL to its PID 1, with which the kernel kills
        every process of its PID namespace at once (raylet, object store, workers, agents), no drain, no
        goodbye to the GCS. Waits until none is left; returns the pid killed."""
        node = self.node(name)
        if node is self.client or node is self.head:
            raise NetnsError(f"kill_node is for worker nodes (and the S3 node), not {name}")
        pid = self.signal_node(name, signal.SIGKILL)
        self.wait_node_gone(name, timeout_s)
        return pid

    def set_link(self, name: str, up: bool) -> None:
        """Cuts (``up=False``) or restores node ``name``'s one link to the others (its ``eth0``): its processes
        keep running but nothing reaches them and they reach nothing, as behind a failed switch port."""
        node = self.node(name)
        if node is self.client or node is self.head:
            raise NetnsError(f"set_link is for worker nodes (and the S3 node), not {name}")
        _ip("-n", node.namespace, "link", "set", "eth0", "up" if up else "down")
        if up:  # the address's route goes with the link; it comes back with it, but say so if it did not
            if f"{SUBNET}.0/24" not in _ip("-n", node.namespace, "route", "show"):
                _ip("-n", node.namespace, "route", "add", f"{SUBNET}.0/24", "dev", "eth0")

    def restart_node(self, name: str, timeout_s: float = 120.0, attempts: int = 3) -> None:
        """Starts worker ``name`` again after it was killed or drained (same namespace, address, resources,
        temp dir and environment; a new Ray node id) and waits until Ray reports it alive. Its log is
        appended to. A ``ray start`` that exits before its node is alive is started again, up to ``attempts``
        times in all, as Kubernetes restarts a crashed container: on a loaded machine Ray 2.60's raylet can
        abort at startup when its dashboard agent is slow to write its port file (``Timed out waiting for
        file .../metrics_agent_port_<node id>``, seen here once)."""
        node = self.node(name)
        if node not in self.workers:
            raise NetnsError(f"restart_node is for worker nodes, not {name}")
        deadline = time.monotonic() + timeout_s
        for attempt in range(1, attempts + 1):
            if self.node_pids(name):
                raise NetnsError(f"node {name} still runs (pids {self.node_pids(name)}): kill it first")
            self._procs.pop(name, None)
            self.start_node(node, node.object_store_mb or 512, append_log=True)
            while time.monotonic() < deadline:
                proc = self._procs[name]
                if proc.poll() is not None:
                    if attempt == attempts:
                        raise NetnsError(f"ray start on {name} ({node.ip}) exited with {proc.returncode} "
                                         f"{attempts} times; log {node.log}")
                    self.wait_node_gone(name, timeout_s=30)
                    break
                if any(n.get("node_ip") == node.ip for n in self.alive_nodes()):
                    return
                time.sleep(1.0)
            else:
                break
        raise NetnsError(f"node {name} ({node.ip}) was not alive within {timeout_s:.0f}s of its restart; "
                         f"log {node.log}")

    # ---- stopping ------------------------------------------------------------------------------------

    def stop(self, grace_s: float = 10.0, keep_files: bool = False) -> None:
        """Kills every process in the cluster's namespaces (SIGTERM, SIGKILL after ``grace_s``), deletes the
        namespaces (and with them their links), then the run dir and the state file. Works on a half-built
        cluster too, and is a no-op for what is already gone."""
        teardown(self.namespaces, grace_s)
        for proc in self._procs.values():  # reap our own children (no zombies left behind)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self._procs.clear()
        if not keep_files:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        self.state_file.unlink(missing_ok=True)
        self.status = "stopped"

    def leftovers(self) -> dict[str, list]:
        """What of this cluster still exists: its namespaces, links in the machine's namespace named after it,
        and its processes: those in its namespaces, its nodes' ``ray start`` pids if they still run, and any
        process whose command line names its run dir (every Ray process gets its node's temp dir there)."""
        spaces = sorted(set(self.namespaces) & set(list_namespaces()))
        links = [line for line in _ip("-o", "link", "show").splitlines() if self.prefix in line]
        pids = set(namespace_pids(spaces)) | {p for p in (n.pid for n in self.members) if p and _alive(p)}
        marker = str(self.run_dir).encode()
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != os.getpid():
                try:
                    cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
                except OSError:
                    continue
                if marker in cmdline and _alive(int(entry)):
                    pids.add(int(entry))
        return {"namespaces": spaces, "links": links, "pids": sorted(pids)}


# ---- module functions -------------------------------------------------------------------------------------


def new_cluster(workers: int = 2, gpu_workers: int = 1, cpus_per_worker: int = 1,
                state_file: Path = DEFAULT_STATE_FILE, prefix: str | None = None, s3: bool = False,
                gpu_cpus: int | None = None) -> NetnsCluster:
    """The description of a cluster (nothing is created): fresh prefix, addresses, groups, resources;
    with ``s3``, an S3 node (moto) at .253. ``gpu_cpus`` gives the GPU-group nodes another CPU count than
    ``cpus_per_worker`` (benchmarks/cluster.py packs the same trainers on 1, 2 or 3 of them)."""
    if not 1 <= workers <= MAX_WORKERS:
        raise NetnsError(f"--workers must be between 1 and {MAX_WORKERS}, got {workers}")
    if not 0 <= gpu_workers <= workers:
        raise NetnsError(f"--gpu-workers must be between 0 and --workers ({workers}), got {gpu_workers}")
    if gpu_cpus is not None and gpu_cpus < 0:
        raise NetnsError(f"--gpu-cpus must be 0 or more, got {gpu_cpus}")
    existing = {name.split("-")[1] for name in list_namespaces() if name.startswith(NAME_PREFIX)}
    while prefix is None or prefix.split("-")[1] in existing or (RUN_ROOT / prefix).exists():
        prefix = NAME_PREFIX + secrets.token_hex(3)
    nodes = [Node("head", f"{prefix}-head", f"{SUBNET}.{HEAD_HOST}", "head", num_cpus=0)]
    for i in range(1, workers + 1):
        gpu = i <= gpu_workers
        group, resource = (GPU_GROUP, GPU_RESOURCE) if gpu else (CPU_GROUP, CPU_RESOURCE)
        cpus = gpu_cpus if gpu and gpu_cpus is not None else cpus_per_worker
        nodes.append(Node(f"w{i}", f"{prefix}-w{i}", f"{SUBNET}.{HEAD_HOST + i}", group, num_cpus=cpus,
                          resources={resource: 1.0}))
    client = Node("client", f"{prefix}-client", f"{SUBNET}.{CLIENT_HOST}", "client")
    s3_node = Node("s3", f"{prefix}-s3", f"{SUBNET}.{S3_HOST}", S3_GROUP) if s3 else None
    run_dir = RUN_ROOT / prefix
    return NetnsCluster(prefix, run_dir, run_dir / "token", Path(state_file), nodes, client, s3=s3_node)


def start(workers: int = 2, gpu_workers: int = 1, cpus_per_worker: int = 1, object_store_mb: int = 512,
          state_file: Path = DEFAULT_STATE_FILE, timeout_s: float = 240.0, s3: bool = False,
          s3_bucket: str = DEFAULT_BUCKET, node_env: dict[str, str] | None = None,
          gpu_cpus: int | None = None) -> NetnsCluster:
    """Builds the namespaces and bridge, starts the S3 node (with ``s3``: moto, bucket ``s3_bucket`` made),
    the head, then the workers, and waits until every node is alive and the head accepts jobs. On any
    failure it tears down what it built (logs kept) and raises. ``node_env`` is added to the environment
    of every Ray node (e.g. ``RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S``, the drain a SIGTERM starts)."""
    require_netns()
    if s3 and not _BUCKET_RE.match(s3_bucket):
        raise NetnsError(f"--s3-bucket must be an S3 bucket name (3-63 of a-z 0-9 . -), got {s3_bucket!r}")
    state_file = Path(state_file)
    if state_file.exists():
        raise NetnsError(f"a netns cluster is already recorded in {state_file}; stop it first "
                         f"(python -m pipeline.netns_cluster --state {state_file} stop)")
    cluster = new_cluster(workers, gpu_workers, cpus_per_worker, state_file, s3=s3, gpu_cpus=gpu_cpus)
    for node in cluster.nodes:
        node.env = dict(node_env or {})
    cluster.run_dir.mkdir(mode=0o700, parents=True)
    try:
        ensure_token(cluster.token_file)
        cluster.build_network()
        if s3:  # first: the nodes get its settings in their environment when they start
            cluster.start_s3(s3_bucket, timeout_s)
        cluster.start_node(cluster.head, object_store_mb)
        cluster.wait_ready(1, timeout_s)
        for worker in cluster.workers:
            cluster.start_node(worker, object_store_mb)
        cluster.wait_ready(len(cluster.nodes), timeout_s, need_agent=True,
                           worker_restarts=len(cluster.workers))  # a worker whose `ray start` aborted: again
        cluster.status = "running"
        cluster.save()
        return cluster
    except BaseException:
        cluster.stop(keep_files=True)
        raise


def load(state_file: Path = DEFAULT_STATE_FILE) -> NetnsCluster:
    state_file = Path(state_file)
    if not state_file.exists():
        raise NetnsError(f"no netns cluster recorded in {state_file} (start one: python -m pipeline.netns_cluster start)")
    return NetnsCluster.from_json(json.loads(state_file.read_text()))


def require_netns() -> None:
    """Raises NetnsError (one line) unless this process can build namespaces: root, ``ip``, ``unshare``."""
    for tool, package in (("ip", "iproute2"), ("unshare", "util-linux")):
        if shutil.which(tool) is None:
            raise NetnsError(f"the netns cluster needs `{tool}` ({package}), which is not on PATH")
    if os.geteuid() != 0:
        raise NetnsError("the netns cluster needs root: network namespaces, veth links and a bridge need "
                         "CAP_SYS_ADMIN and CAP_NET_ADMIN (run it with sudo)")


def list_namespaces() -> list[str]:
    """Names of the machine's named network namespaces (``ip netns list``)."""
    if shutil.which("ip") is None:
        return []
    return [line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()]


def namespace_pids(names: Iterable[str]) -> dict[int, str]:
    """{pid: namespace} of every process whose network namespace is one of ``names`` (what ``ip netns pids``
    reports, for several namespaces in one pass over /proc). Zombies (no namespace left) are not listed."""
    inodes = {}
    for name in names:
        try:
            st = os.stat(f"/run/netns/{name}")
        except OSError:
            continue
        inodes[(st.st_dev, st.st_ino)] = name
    found: dict[int, str] = {}
    if not inodes:
        return found
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in inodes and _alive(int(entry)):
            found[int(entry)] = inodes[(st.st_dev, st.st_ino)]
    return found


def teardown(namespaces: Sequence[str], grace_s: float = 10.0) -> None:
    """Kills every process in ``namespaces`` by pid (SIGTERM, then SIGKILL after ``grace_s``), then deletes
    the namespaces (which removes their veth ends and the bridge). Only processes found *inside* these
    namespaces are signalled; a namespace that does not exist is skipped."""
    present = [n for n in namespaces if n in set(list_namespaces())]
    # An open handle keeps each namespace (and its inode number) alive until we are done with it.
    handles = [os.open(f"/run/netns/{n}", os.O_RDONLY) for n in present]
    try:
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            deadline = time.monotonic() + wait_s
            signalled: set[int] = set()
            while True:
                pids = namespace_pids(present)
                if not pids:
                    break
                for pid in set(pids) - signalled:  # new processes (a restarting worker) get the signal too
                    _signal(pid, sig)
                    signalled.add(pid)
                if time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        left = namespace_pids(present)
        if left:
            raise NetnsError(f"processes {sorted(left)} survived SIGKILL in {sorted(set(left.values()))}")
        for name in present:
            _ip("netns", "delete", name)
    finally:
        for fd in handles:
            os.close(fd)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _add_namespace(name: str) -> None:
    try:
        _ip("netns", "add", name)
    except NetnsError as err:
        raise NetnsError(f"cannot create network namespace {name} ({err}); the netns cluster needs root with "
                         "CAP_SYS_ADMIN and CAP_NET_ADMIN") from None


def _ip(*args: str) -> str:
    try:
        done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise NetnsError("the netns cluster needs `ip` (iproute2), which is not on PATH") from None
    if done.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {_last_line(done.stderr) or f'exit {done.returncode}'}")
    return done.stdout


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _venv_path() -> str:
    return str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin")


# Run in the client namespace by start_s3: creates the bucket on the S3 node (fails while it is not up yet).
_MAKE_BUCKET = """
import os, sys
import boto3, botocore.config
config = botocore.config.Config(connect_timeout=2, read_timeout=10, retries={"total_max_attempts": 1})
boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], config=config).create_bucket(Bucket=sys.argv[1])
"""


def _probe_main(dashboard: str, agent: str | None) -> int:
    """Runs inside the client namespace (with the token in its environment): prints Ray's node list (the
    public state API) and whether the head's job agent port accepts connections, as one JSON object."""
    result: dict = {"nodes": None, "agent": False, "error": None}
    try:
        from ray.util.state import list_nodes

        keys = ("node_id", "node_ip", "is_head_node", "state", "resources_total")
        rows = list_nodes(address=dashboard, limit=10000, timeout=5, raise_on_missing_output=False)
        result["nodes"] = [{k: (row.get(k) if isinstance(row, dict) else getattr(row, k, None)) for k in keys}
                           for row in rows]
    except Exception as err:  # noqa: BLE001 - not up yet, refused, ...: the caller polls again
        result["error"] = _last_line(f"{type(err).__name__}: {err}")
    if agent:
        host, port = agent.rsplit(":", 1)
        try:
            socket.create_connection((host, int(port)), timeout=2).close()
            result["agent"] = True
        except OSError:
            pass
    print(json.dumps(result))
    return 0


def _where_main(dashboard: str, submission_id: str) -> int:
    """Runs inside the client namespace: the actors and tasks of the Ray jobs a submission started, with the
    address of the node each ran on, as one JSON object (see ``NetnsCluster.where``)."""
    from ray.util.state import list_actors, list_jobs, list_nodes, list_tasks

    def get(row, key):  # noqa: ANN001, ANN202 - the state API's rows are dataclasses or dicts
        return row.get(key) if isinstance(row, dict) else getattr(row, key, None)

    common = {"address": dashboard, "limit": 10000, "timeout": 30, "raise_on_missing_output": False}
    ips = {get(n, "node_id"): get(n, "node_ip") for n in list_nodes(**common)}
    job_ids = sorted({get(j, "job_id") for j in list_jobs(address=dashboard, limit=10000, timeout=30)
                      if get(j, "submission_id") == submission_id and get(j, "job_id")})
    result: dict = {"job_ids": job_ids, "actors": [], "tasks": []}
    for job_id in job_ids:
        for row in list_actors(filters=[("job_id", "=", job_id)], detail=True, **common):
            result["actors"].append({"class_name": get(row, "class_name"), "state": str(get(row, "state")),
                                     "node_ip": ips.get(get(row, "node_id"))})
        for row in list_tasks(filters=[("job_id", "=", job_id)], detail=True, **common):
            if str(get(row, "type")).endswith("NORMAL_TASK"):
                result["tasks"].append({"name": get(row, "name"), "state": str(get(row, "state")),
                                        "node_ip": ips.get(get(row, "node_id"))})
    print(json.dumps(result))
    return 0


def _print_where(cluster: NetnsCluster, submission_id: str) -> int:
    found = cluster.where(submission_id)
    if not found["job_ids"]:
        print(f"no Ray job of submission {submission_id!r} is known to the cluster")
        return 1
    groups = {n.ip: n.group for n in cluster.nodes}
    print(f"submission {submission_id}: Ray job(s) {', '.join(found['job_ids'])}")
    counts: dict[tuple, int] = {}
    for kind, key in (("actor", "class_name"), ("task", "name")):
        for row in found[f"{kind}s"]:
            place = (kind, str(row[key]), row["node"] or "?", row["node_ip"] or "not placed")
            counts[place] = counts.get(place, 0) + 1
    width = max((len(name) for _, name, _, _ in counts), default=0)
    for (kind, name, node, ip), count in sorted(counts.items(), key=lambda item: (item[0][0], item[0][2], item[0][1])):
        print(f"  {kind:<5} {count:>3} x {name:<{width}}  on {node:<5} {ip:<13} {groups.get(ip, '')}")
    return 0


def _print_status(cluster: NetnsCluster) -> int:
    existing = set(list_namespaces())
    print(f"netns cluster {cluster.prefix} ({cluster.status}); state {cluster.state_file}")
    print(f"  GCS {cluster.gcs_address}, dashboard {cluster.dashboard_url} (token auth on; reachable only from "
          f"the cluster's namespaces: use exec)")
    print(f"  token {cluster.token_file}, logs and Ray temp dirs in {cluster.run_dir}")
    nodes = {n.get("node_ip"): n for n in (cluster.probe().get("nodes") or []) if n.get("state") == "ALIVE"}
    if cluster.s3:
        print(f"  S3 {cluster.s3_endpoint} (moto; bucket {cluster.s3_bucket!r}; dummy credentials in "
              f"{cluster.s3_credentials_file}, set for every node and for exec)")
    for node in cluster.members:
        ns_state = "ok" if node.namespace in existing else "MISSING"
        ray_state = ""
        if node is cluster.s3:
            ray_state = "moto S3 server"
        elif node is not cluster.client:
            info = nodes.get(node.ip)
            ray_state = (f"ray ALIVE, resources {_short_resources(info.get('resources_total') or {})}" if info
                         else "ray not alive")
        pid = f"pid {node.pid}{'' if node.pid and _alive(node.pid) else ' (gone)'}" if node.pid else ""
        print(f"  {node.name:<7} {node.ip:<13} {node.group:<12} netns {node.namespace} [{ns_state}] {pid} {ray_state}")
    healthy = all(n in existing for n in cluster.namespaces) and len(nodes) == len(cluster.nodes)
    return 0 if healthy else 1


def _short_resources(resources: dict) -> str:
    shown = {k: v for k, v in resources.items() if not k.startswith("node:") and "memory" not in k}
    return ", ".join(f"{k}={v:g}" for k, v in sorted(shown.items())) or "none"


def _orphans(known: str | None = None) -> list[str]:
    prefixes = sorted({n.rsplit("-", 1)[0] for n in list_namespaces() if n.startswith(NAME_PREFIX)} - {known})
    return [p for p in prefixes if _PREFIX_RE.match(p)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.netns_cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state", type=Path, default=Path(os.environ.get(STATE_ENV) or DEFAULT_STATE_FILE),
                        help=f"the cluster's state file (default: ${STATE_ENV} or {DEFAULT_STATE_FILE})")
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{start,stop,status,exec,where,kill,term,restart,link}")
    start_p = sub.add_parser("start", help="build the namespaces and start the head and the workers")
    start_p.add_argument("--workers", type=int, default=2, help="worker nodes (default 2)")
    start_p.add_argument("--gpu-workers", type=int, default=1,
                         help=f"how many of them form the GPU-worker group ({GPU_RESOURCE}; default 1), the rest "
                              f"the CPU-worker group ({CPU_RESOURCE}); no real GPUs either way")
    start_p.add_argument("--cpus-per-worker", type=int, default=1, help="CPUs each worker advertises (default 1)")
    start_p.add_argument("--gpu-cpus", type=int, help="CPUs each GPU-group worker advertises (default: "
                                                      "--cpus-per-worker)")
    start_p.add_argument("--object-store-mb", type=int, default=512, help="object store per node (default 512)")
    start_p.add_argument("--timeout", type=float, default=240.0, help="seconds to wait for the nodes (default 240)")
    start_p.add_argument("--s3", action="store_true",
                         help=f"add an S3 node: a moto server at http://{SUBNET}.{S3_HOST}:{S3_PORT} in its own "
                              "namespace, its endpoint and dummy credentials in every node's and exec's environment")
    start_p.add_argument("--s3-bucket", default=DEFAULT_BUCKET,
                         help=f"the bucket created on the S3 node (default {DEFAULT_BUCKET})")
    start_p.add_argument("--node-env", action="append", default=[], metavar="KEY=VALUE",
                         help="add to every Ray node's environment (repeatable), e.g. "
                              "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=20, the drain a SIGTERM starts (`term`)")
    stop_p = sub.add_parser("stop", help="kill every process of the cluster, delete its namespaces and files")
    stop_p.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL (default 10)")
    stop_p.add_argument("--keep-files", action="store_true", help="keep the run dir (logs, Ray temp dirs)")
    stop_p.add_argument("--prefix", help="stop the namespaces mvnc-XXXXXX-* of a cluster whose state file is lost")
    sub.add_parser("status", help="namespaces, pids and Ray nodes of the cluster")
    exec_p = sub.add_parser("exec", help="run a command in the client namespace with RAY_ADDRESS and the token set "
                                         "(exec -- CMD ...)")
    exec_p.add_argument("cmd", nargs=argparse.REMAINDER)
    where_p = sub.add_parser("where", help="on which node each actor and task of a submitted job ran (Ray's state API)")
    where_p.add_argument("submission_id", help="the id `ray job submit` printed (raysubmit_... or --submission-id)")
    where_p.add_argument("--json", action="store_true", help="print one JSON object instead")
    kill_p = sub.add_parser("kill", help="SIGKILL every process of a worker node at once (a machine lost)")
    kill_p.add_argument("node", help="w1, w2, ...")
    term_p = sub.add_parser("term", help="SIGTERM a worker node's `ray start`, as Kubernetes evicts a pod: Ray "
                                         "drains the node (reason PREEMPTION), then ends its processes")
    term_p.add_argument("node", help="w1, w2, ...")
    term_p.add_argument("--wait", action="store_true", help="wait until the node's processes are gone")
    restart_p = sub.add_parser("restart", help="start a killed or drained worker node again (same address)")
    restart_p.add_argument("node", help="w1, w2, ...")
    link_p = sub.add_parser("link", help="cut (down) or restore (up) a worker node's link to the others")
    link_p.add_argument("node", help="w1, w2, ...")
    link_p.add_argument("state", choices=("down", "up"))
    where_int = sub.add_parser("_where")  # internal: runs inside the client namespace (NetnsCluster.where)
    where_int.add_argument("--dashboard", required=True)
    where_int.add_argument("submission_id")
    probe_p = sub.add_parser("_probe")  # internal: runs inside the client namespace (NetnsCluster.probe)
    probe_p.add_argument("--dashboard", required=True)
    probe_p.add_argument("--agent")
    args = parser.parse_args(argv)

    try:
        if args.command == "_probe":
            return _probe_main(args.dashboard, args.agent)
        if args.command == "_where":
            return _where_main(args.dashboard, args.submission_id)
        if args.command == "start":
            node_env = dict(item.split("=", 1) for item in args.node_env if "=" in item)
            if len(node_env) != len(args.node_env):
                parser.error("--node-env takes KEY=VALUE")
            cluster = start(args.workers, args.gpu_workers, args.cpus_per_worker, args.object_store_mb, args.state,
                            args.timeout, s3=args.s3, s3_bucket=args.s3_bucket, node_env=node_env,
                            gpu_cpus=args.gpu_cpus)
            groups = ", ".join(f"{w.name} {w.ip} ({w.group}: {', '.join(w.resources)})" for w in cluster.workers)
            print(f"netns cluster {cluster.prefix}: head {cluster.head.ip} (0 CPUs), workers {groups}; "
                  f"client namespace {cluster.client.namespace} ({cluster.client.ip})")
            print(f"  GCS {cluster.gcs_address}, dashboard {cluster.dashboard_url} (token auth on, "
                  f"reachable only from the cluster's namespaces)")
            if cluster.s3:
                print(f"  S3 node {cluster.s3_endpoint} (moto), bucket s3://{cluster.s3_bucket}; its endpoint and "
                      f"dummy credentials are in every node's environment and exec's")
            print("  e.g. scripts/netns-cluster exec -- ray status; stop: scripts/netns-cluster stop")
            return 0
        if args.command == "stop" and args.prefix:
            if not _PREFIX_RE.match(args.prefix):
                parser.error(f"--prefix must look like mvnc-1a2b3c, got {args.prefix!r}")
            names = [n for n in list_namespaces() if n.startswith(args.prefix + "-")]
            teardown(sorted(names, key=lambda n: n.endswith("-br")), args.grace)
            if not args.keep_files:
                shutil.rmtree(RUN_ROOT / args.prefix, ignore_errors=True)
            print(f"stopped {args.prefix}: deleted {len(names)} namespaces")
            return 0
        if args.command == "status" and not args.state.exists():
            print(f"no netns cluster recorded in {args.state}")
            for prefix in _orphans():
                print(f"  namespaces of another cluster: {prefix}-* (its own state file, or stop --prefix {prefix})")
            return 1
        cluster = load(args.state)
        if args.command == "stop":
            cluster.stop(args.grace, args.keep_files)
            print(f"stopped {cluster.prefix}")
            return 0
        if args.command == "status":
            return _print_status(cluster)
        if args.command in ("kill", "term", "restart", "link"):
            if args.node not in {w.name for w in cluster.workers}:
                parser.error(f"{args.command} takes a worker node: {', '.join(w.name for w in cluster.workers)}")
            if args.command == "kill":
                pid = cluster.kill_node(args.node)
                print(f"killed {args.node} (its PID 1 was {pid}): no process of it is left")
            elif args.command == "link":
                cluster.set_link(args.node, up=args.state == "up")
                print(f"{args.node}'s link is {args.state}")
            elif args.command == "term":
                pid = cluster.signal_node(args.node, signal.SIGTERM)
                gone = f"; gone after {cluster.wait_node_gone(args.node, 600):.1f}s" if args.wait else ""
                print(f"sent SIGTERM to {args.node}'s ray start (pid {pid}){gone}")
            else:
                cluster.restart_node(args.node)
                print(f"restarted {args.node} ({cluster.node(args.node).ip}): alive")
            return 0
        if args.command == "where":
            if args.json:
                print(json.dumps(cluster.where(args.submission_id)))
                return 0
            return _print_where(cluster, args.submission_id)
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not cmd:
            parser.error("exec needs a command after --")
        try:
            return cluster.exec(cmd).returncode
        except KeyboardInterrupt:
            return 130
    except NetnsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
