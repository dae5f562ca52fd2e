"""The namespace cluster: what it builds, where tasks run, token auth, and that ``stop`` leaves nothing.

The quick tests build namespaces without Ray; the ``slow`` ones share one Ray cluster (``netns_cluster``
in conftest.py) whose last test stops it. Every client runs inside the cluster's client namespace and
nothing here contacts an address outside the cluster's namespaces (the isolation checks are route
lookups, which send no packet).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline import netns_cluster as nc

ROOT = Path(__file__).resolve().parents[2]


def _ns_inodes(namespaces: list[str]) -> tuple[list[int], set[tuple[int, int]]]:
    """Open handles on the namespaces (they keep them, and their inode numbers, alive) and their ids."""
    fds = [os.open(f"/run/netns/{n}", os.O_RDONLY) for n in namespaces]
    return fds, {(os.fstat(fd).st_dev, os.fstat(fd).st_ino) for fd in fds}


def _processes_in(inodes: set[tuple[int, int]]) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                st = os.stat(f"/proc/{entry}/ns/net")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in inodes:
                found.append(int(entry))
    return found


def _assert_gone(cluster: nc.NetnsCluster, inodes: set[tuple[int, int]]) -> None:
    assert cluster.leftovers() == {"namespaces": [], "links": [], "pids": []}
    assert not _processes_in(inodes), "processes left in the cluster's (deleted) namespaces"
    assert not [n for n in nc.list_namespaces() if n.startswith(cluster.prefix)]
    assert cluster.prefix not in subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert not cluster.state_file.exists() and not cluster.run_dir.exists()


# ---- quick: no Ray -------------------------------------------------------------------------------------------


def test_cli_and_script_help() -> None:
    for form in ([sys.executable, "-m", "pipeline.netns_cluster"], [str(ROOT / "scripts" / "netns-cluster")]):
        for args in (["--help"], ["start", "--help"], ["exec", "--help"]):
            out = subprocess.run([*form, *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
            assert out.returncode == 0 and "usage" in out.stdout.lower(), (form, args, out.stderr[-2000:])


def test_description_names_addresses_and_groups(tmp_path: Path) -> None:
    a = nc.new_cluster(workers=3, gpu_workers=1, state_file=tmp_path / "a.json")
    b = nc.new_cluster(workers=3, state_file=tmp_path / "b.json")
    assert a.prefix != b.prefix and not set(a.namespaces) & set(b.namespaces)
    assert all(n.startswith(a.prefix + "-") for n in a.namespaces) and len(set(a.namespaces)) == 6
    assert [n.ip for n in a.nodes] == ["10.213.0.1", "10.213.0.2", "10.213.0.3", "10.213.0.4"]
    assert a.head.num_cpus == 0 and a.head.resources == {}
    assert [(w.group, w.resources, w.num_cpus) for w in a.workers] == [
        ("gpu-workers", {"mvit_gpu_node": 1.0}, 1), ("cpu-workers", {"mvit_cpu_node": 1.0}, 1),
        ("cpu-workers", {"mvit_cpu_node": 1.0}, 1)]
    assert all(len(f"v-{n.name}") <= 15 for n in (*a.nodes, a.client))  # interface names: IFNAMSIZ
    assert nc.NetnsCluster.from_json(json.loads(json.dumps(a.to_json()))) == a
    with pytest.raises(nc.NetnsError, match="--workers"):
        nc.new_cluster(workers=0)


def test_refuses_to_start_without_root_or_ip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = tmp_path / "state.json"
    with monkeypatch.context() as patch:
        patch.setattr(nc.os, "geteuid", lambda: 1000)
        with pytest.raises(nc.NetnsError, match="needs root") as err:
            nc.start(state_file=state)
    assert "\n" not in str(err.value)
    with monkeypatch.context() as patch:
        patch.setattr(nc.shutil, "which", lambda tool: None)
        with pytest.raises(nc.NetnsError, match="needs `ip`"):
            nc.start(state_file=state)
    assert not state.exists()
    out = subprocess.run([sys.executable, "-m", "pipeline.netns_cluster", "start"], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, "PATH": "/nonexistent"}, timeout=60)
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and out.stderr.startswith("error: "), out.stderr


def test_network_is_private_and_stop_cleans_a_half_built_cluster(tmp_path: Path) -> None:
    """The namespaces and bridge alone (what a crash after the network step leaves): the nodes reach each
    other and nothing else, the machine's namespace has no part in it, and ``stop`` from another process
    kills a process running inside and removes everything."""
    nc.require_netns()
    cluster = nc.new_cluster(workers=1, state_file=tmp_path / "state.json")
    cluster.run_dir.mkdir(mode=0o700)
    sleeper = None
    try:
        cluster.build_network()
        # a server in the head's namespace, a client in the client namespace
        server = subprocess.Popen(["ip", "netns", "exec", cluster.head.namespace, sys.executable, "-c",
                                   "import socket; s = socket.create_server(('0.0.0.0', 7777)); print('up', flush=True);"
                                   " c, _ = s.accept(); c.sendall(b'hello'); c.close()"],
                                  stdout=subprocess.PIPE, text=True)
        assert server.stdout is not None and server.stdout.readline().strip() == "up"
        got = cluster.exec([sys.executable, "-c", f"import socket; print(socket.create_connection(('{cluster.head.ip}', "
                            "7777), timeout=10).recv(5).decode())"], capture_output=True, text=True, timeout=60)
        assert got.stdout.strip() == "hello", got.stderr
        server.wait(timeout=30)
        for node in (*cluster.nodes, cluster.client):
            routes = subprocess.run(["ip", "-n", node.namespace, "route", "show"], capture_output=True, text=True)
            assert routes.stdout.split() == ["10.213.0.0/24", "dev", "eth0", "proto", "kernel", "scope", "link",
                                             "src", node.ip], routes.stdout
            # a route lookup (no packet is sent): every address outside the cluster is unreachable
            outside = subprocess.run(["ip", "-n", node.namespace, "route", "get", "192.0.2.1"], capture_output=True,
                                     text=True)
            assert outside.returncode != 0 and "unreachable" in outside.stderr.lower(), outside
        assert "10.213.0." not in subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
        assert cluster.prefix not in subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout

        # a process in a node's namespace, as a half-started node would leave; then `stop` from another process
        sleeper = subprocess.Popen(["ip", "netns", "exec", cluster.workers[0].namespace, "sleep", "600"])
        cluster.workers[0].pid = sleeper.pid
        cluster.save()
        fds, inodes = _ns_inodes(cluster.namespaces)
        try:
            out = subprocess.run([sys.executable, "-m", "pipeline.netns_cluster", "--state", str(cluster.state_file),
                                  "stop", "--grace", "2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
            assert out.returncode == 0, out.stderr
            assert sleeper.wait(timeout=10) == -signal.SIGTERM
            _assert_gone(cluster, inodes)
        finally:
            for fd in fds:
                os.close(fd)
    finally:
        if sleeper is not None and sleeper.poll() is None:
            sleeper.kill()
        cluster.stop(grace_s=1.0)


@pytest.mark.slow
def test_a_failing_start_tears_down_what_it_built(tmp_path: Path) -> None:
    """The head's `ray start` fails (an object store below Ray's minimum): start raises with the log's tail
    and leaves no namespace, process or state file (the run dir with the logs is kept)."""
    before = set(nc.list_namespaces())
    state = tmp_path / "state.json"
    with pytest.raises(nc.NetnsError, match="ray start on head") as err:
        nc.start(workers=1, object_store_mb=1, state_file=state, timeout_s=120)
    assert "minimum allowed" in str(err.value)
    assert set(nc.list_namespaces()) == before and not state.exists()
    run_dir = Path(re.search(r"/tmp/mvnc-[0-9a-f]{6}", str(err.value)).group(0))
    marker = str(run_dir).encode()
    assert not [p for p in os.listdir("/proc") if p.isdigit() and marker in _cmdline(p)]
    shutil.rmtree(run_dir)


def _cmdline(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


# ---- slow: one Ray cluster for the module -----------------------------------------------------------------


@pytest.mark.slow
def test_nodes_addresses_and_token_file(netns_cluster: nc.NetnsCluster) -> None:
    cluster = netns_cluster
    nodes = {n["node_ip"]: n for n in cluster.alive_nodes()}
    assert sorted(nodes) == sorted(n.ip for n in cluster.nodes) == ["10.213.0.1", "10.213.0.2", "10.213.0.3"]
    head = nodes[cluster.head.ip]
    assert head["is_head_node"] and head["resources_total"].get("CPU", 0) == 0
    for worker in cluster.workers:
        info = nodes[worker.ip]
        assert not info["is_head_node"] and info["resources_total"]["CPU"] == 1
        assert info["resources_total"].get("GPU", 0) == 0
        custom = {k for k in info["resources_total"] if k.startswith("mvit_")}
        assert custom == set(worker.resources), (worker.name, info["resources_total"])
    assert len({n["node_id"] for n in nodes.values()}) == 3
    for node in (*cluster.nodes, cluster.client):  # each namespace holds its node's address, and only it
        addrs = subprocess.run(["ip", "-n", node.namespace, "-o", "-4", "addr", "show"], capture_output=True,
                               text=True).stdout
        assert sorted(line.split()[3] for line in addrs.splitlines()) == sorted(["127.0.0.1/8", f"{node.ip}/24"])
    assert stat.S_IMODE(cluster.token_file.stat().st_mode) == 0o600
    assert nc.load(cluster.state_file) == cluster


PLACEMENT_PROBE = textwrap.dedent("""
    import json
    import ray

    ray.init()

    def here():
        return {"node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address()}

    where = ray.remote(num_cpus=1)(here)
    gpu = [where.options(resources={"mvit_gpu_node": 0.01}).remote() for _ in range(2)]
    cpu = [where.options(resources={"mvit_cpu_node": 0.01}).remote() for _ in range(2)]
    plain = [where.remote() for _ in range(4)]
    print("PLACEMENT " + json.dumps({"driver": here(), "gpu": ray.get(gpu), "cpu": ray.get(cpu),
                                     "plain": ray.get(plain)}))
""")


def _placement(cluster: nc.NetnsCluster, workdir: Path, extra_args: list[str]) -> dict:
    workdir.mkdir()
    (workdir / "probe.py").write_text(PLACEMENT_PROBE)
    done = cluster.submit(["python", "probe.py"], working_dir=workdir, extra_args=extra_args, timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith("PLACEMENT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("PLACEMENT "))


@pytest.mark.slow
def test_tasks_run_on_the_node_of_their_group(netns_cluster: nc.NetnsCluster, tmp_path: Path) -> None:
    """A job submitted from the client namespace: tasks asking for a group's custom resource run on the node
    that advertises it, CPU tasks never on the head (0 CPUs); the driver is on the head, or on the GPU worker
    with ``--entrypoint-resources`` (as the RayJob places it), and attaches to that node's own raylet."""
    cluster = netns_cluster
    ids = {n["node_ip"]: n["node_id"] for n in cluster.alive_nodes()}
    gpu_worker, cpu_worker = cluster.workers
    default = _placement(cluster, tmp_path / "default", [])
    assert default["driver"] == {"ip": cluster.head.ip, "node_id": ids[cluster.head.ip]}
    assert all(t == {"ip": gpu_worker.ip, "node_id": ids[gpu_worker.ip]} for t in default["gpu"]), default
    assert all(t == {"ip": cpu_worker.ip, "node_id": ids[cpu_worker.ip]} for t in default["cpu"]), default
    assert all(t["ip"] in {gpu_worker.ip, cpu_worker.ip} and t["node_id"] == ids[t["ip"]] for t in default["plain"])
    on_gpu = _placement(cluster, tmp_path / "on-gpu", ["--entrypoint-resources", json.dumps({"mvit_gpu_node": 0.001})])
    assert on_gpu["driver"] == {"ip": gpu_worker.ip, "node_id": ids[gpu_worker.ip]}, on_gpu


TOKEN_PROBE = textwrap.dedent("""
    import sys, urllib.error, urllib.request
    codes = []
    for headers in ({}, {"Authorization": "Bearer " + "0" * 64}):
        try:
            urllib.request.urlopen(urllib.request.Request(sys.argv[1] + "/api/v0/nodes", headers=headers), timeout=10)
            codes.append(200)
        except urllib.error.HTTPError as err:
            codes.append(err.code)
    print(codes)
""")


@pytest.mark.slow
def test_refuses_a_client_without_the_token(netns_cluster: nc.NetnsCluster, tmp_path: Path) -> None:
    cluster = netns_cluster
    home = {"HOME": str(tmp_path)}  # no ~/.ray/auth_token to fall back on
    http = cluster.exec([sys.executable, "-c", TOKEN_PROBE, cluster.dashboard_url], auth=False, env=home,
                        capture_output=True, text=True, timeout=60)
    assert http.stdout.strip() == "[401, 403]", http.stdout + http.stderr
    started = time.monotonic()
    for env in (home, {**home, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}):
        refused = cluster.exec([nc.ray_executable(), "status"], auth=False, env=env, capture_output=True, text=True,
                               timeout=180)
        assert refused.returncode != 0 and "mvit_gpu_node" not in refused.stdout, refused.stdout[-2000:]
    print(f"refusals took {time.monotonic() - started:.1f}s")
    for _ in range(10):  # the autoscaler's summary that `ray status` prints is refreshed every 5 s
        allowed = cluster.exec([nc.ray_executable(), "status"], capture_output=True, text=True, timeout=120)
        if allowed.returncode != 0 or "mvit_gpu_node" in allowed.stdout:
            break
        time.sleep(3)
    assert allowed.returncode == 0 and "mvit_gpu_node" in allowed.stdout, allowed.stdout[-2000:] + allowed.stderr


@pytest.mark.slow
def test_stop_leaves_no_namespace_link_or_process(netns_cluster: nc.NetnsCluster) -> None:
    """Runs last in this module: it stops the shared cluster (the fixture's own stop is then a no-op)."""
    cluster = netns_cluster
    assert all(n in nc.list_namespaces() for n in cluster.namespaces)
    assert cluster.leftovers()["pids"], "the running cluster has processes"
    fds, inodes = _ns_inodes(cluster.namespaces)
    try:
        started = time.monotonic()
        cluster.stop(grace_s=5.0)
        print(f"stop took {time.monotonic() - started:.1f}s")
        _assert_gone(cluster, inodes)
    finally:
        for fd in fds:
            os.close(fd)
