"""The main job across the nodes of a namespace cluster with its S3 node (issue #12, "The main job across
nodes"): preprocessing as Ray tasks on several nodes writing to S3, byte-identical to a local run, then
the training job with its two ranks on the two GPU-group nodes, decoder actors on the CPU-group nodes,
shards and checkpoints on S3 and MLflow recording the placement.

The quick tests need no Ray (the description, the S3 node alone); the ``slow`` ones share one cluster
(``netns_s3_cluster`` in conftest.py: head with 0 CPUs, workers w1 w2 in the GPU group and w3 w4 in the
CPU group, 1 CPU each, moto at 10.213.0.253:5000) whose last test stops it. Every client runs in the
cluster's client namespace; nothing contacts an address outside the cluster's namespaces.
"""

from __future__ import annotations

import filecmp
import json
import os
import re
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from pipeline import netns_cluster as nc

ROOT = Path(__file__).resolve().parents[2]
BUCKET = nc.DEFAULT_BUCKET
SHARD_ARGS = ["--short-side", "72", "--shard-bytes", "0", "--shard-samples", "3", "--no-progress"]
TRAIN_SHARDS, VAL_SHARDS = 4, 2  # 12 train and 6 val videos, 3 a shard


# ---- quick: no Ray -------------------------------------------------------------------------------------------


def test_description_with_an_s3_node(tmp_path: Path) -> None:
    cluster = nc.new_cluster(workers=4, gpu_workers=2, state_file=tmp_path / "state.json", s3=True)
    assert cluster.s3 is not None and cluster.s3.ip == "10.213.0.253" and cluster.s3.group == "s3"
    assert cluster.s3_endpoint == "http://10.213.0.253:5000"
    assert cluster.s3.namespace == f"{cluster.prefix}-s3" and cluster.s3.namespace in cluster.namespaces
    assert cluster.namespaces[-1] == cluster.bridge_namespace and len(cluster.namespaces) == 8
    assert [w.group for w in cluster.workers] == ["gpu-workers", "gpu-workers", "cpu-workers", "cpu-workers"]
    assert nc.NetnsCluster.from_json(json.loads(json.dumps(cluster.to_json()))) == cluster
    plain = nc.new_cluster(workers=1, state_file=tmp_path / "plain.json")
    assert plain.s3 is None and plain.s3_endpoint is None and plain.s3_env() == {}
    assert nc.NetnsCluster.from_json(json.loads(json.dumps(plain.to_json()))) == plain
    with pytest.raises(nc.NetnsError, match="--s3-bucket"):
        nc.start(s3=True, s3_bucket="Not_A_Bucket", state_file=tmp_path / "bad.json")
    help_text = subprocess.run([sys.executable, "-m", "pipeline.netns_cluster", "start", "--help"], cwd=ROOT,
                               capture_output=True, text=True, timeout=60).stdout
    assert "--s3" in help_text and "--s3-bucket" in help_text
    for form in ([sys.executable, "-m", "pipeline.netns_cluster"], [str(ROOT / "scripts" / "netns-cluster")]):
        out = subprocess.run([*form, "where", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "SUBMISSION_ID" in out.stdout.upper(), out.stderr[-2000:]


def test_s3_node_alone_serves_the_client_namespace_and_stops(tmp_path: Path) -> None:
    """The network and the S3 node without Ray: moto answers at 10.213.0.253:5000 from the client namespace
    with the cluster's credentials (a 0600 file, never in the state file), the bucket exists, the machine's
    namespace has no address on the network, and ``stop`` kills moto by pid and removes everything."""
    nc.require_netns()
    cluster = nc.new_cluster(workers=1, state_file=tmp_path / "state.json", s3=True)
    cluster.run_dir.mkdir(mode=0o700)
    try:
        cluster.build_network()
        cluster.start_s3("bucket-one", timeout_s=60)
        assert cluster.s3 is not None and cluster.s3.pid and cluster.s3_bucket == "bucket-one"
        env = cluster.s3_env()
        assert env["AWS_ENDPOINT_URL"] == "http://10.213.0.253:5000" and env["AWS_EC2_METADATA_DISABLED"] == "true"
        assert stat.S_IMODE(cluster.s3_credentials_file.stat().st_mode) == 0o600
        assert env["AWS_SECRET_ACCESS_KEY"] not in cluster.state_file.read_text()
        listing = cluster.exec([sys.executable, "-c", "import s3fs; fs = s3fs.S3FileSystem(); "
                                "fs.pipe('bucket-one/x/y.txt', b'hello'); "
                                "print(fs.ls('bucket-one/x'), fs.cat('bucket-one/x/y.txt'))"],
                               capture_output=True, text=True, timeout=60)
        assert listing.stdout.strip() == "['bucket-one/x/y.txt'] b'hello'", listing.stderr[-2000:]
        assert "10.213.0." not in subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
        loaded = nc.load(cluster.state_file)
        assert loaded.s3 == cluster.s3 and loaded.s3_env() == env
        out = subprocess.run([sys.executable, "-m", "pipeline.netns_cluster", "--state", str(cluster.state_file),
                              "status"], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert "S3 http://10.213.0.253:5000" in out.stdout and "moto S3 server" in out.stdout, out.stdout
        assert env["AWS_SECRET_ACCESS_KEY"] not in out.stdout + out.stderr
        pid = cluster.s3.pid
    finally:
        cluster.stop(grace_s=2.0)
    assert not nc._alive(pid)
    assert cluster.leftovers() == {"namespaces": [], "links": [], "pids": []}
    assert not cluster.run_dir.exists()


# ---- slow: one cluster with an S3 node for the module ---------------------------------------------------------


@pytest.fixture(scope="module")
def raw_videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic Kinetics (3 classes, 4 train and 2 val videos each, 96x72, 2 s) on the machine's filesystem,
    which every node shares."""
    raw = tmp_path_factory.mktemp("across") / "raw"
    subprocess.run([sys.executable, "-m", "preprocessing", "synth", "kinetics", "--out", str(raw), "--classes", "3",
                    "--per-class", "4", "--val-per-class", "2", "--seconds", "2", "--size", "96x72"], check=True,
                   capture_output=True, text=True, timeout=300)
    return raw


def _preprocess_args(raw: Path, csv: str, out: str) -> list[str]:
    return ["-m", "preprocessing", "kinetics", "--csv", str(raw / "annotations" / csv), "--videos", str(raw),
            "--out", out, *SHARD_ARGS]


@pytest.fixture(scope="module")
def ray_preprocessed(netns_s3_cluster: nc.NetnsCluster, raw_videos: Path) -> dict:
    """Both splits preprocessed by ``ray job submit`` from the client namespace, as Ray tasks (``--ray``) on
    the cluster, to s3://mvit/shards on the S3 node; returns each split's submission and where its tasks ran."""
    cluster, found = netns_s3_cluster, {}
    for split, csv, shards in (("train", "train.csv", TRAIN_SHARDS), ("val", "validate.csv", VAL_SHARDS)):
        submission = f"preprocess-{split}-{uuid.uuid4().hex[:8]}"
        started = time.monotonic()
        done = cluster.submit(["python", *_preprocess_args(raw_videos, csv, f"s3://{BUCKET}/shards"), "--ray"],
                              working_dir=ROOT, extra_args=["--submission-id", submission], timeout=600)
        print(f"preprocessing {split} on the cluster: {time.monotonic() - started:.1f}s")
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
        assert f"{shards} shards (0 already complete)" in done.stdout, done.stdout[-3000:]
        found[split] = {"submission": submission, "output": done.stdout,
                        "tasks": _shard_tasks(cluster, submission, shards)}
    return found


def _shard_tasks(cluster: nc.NetnsCluster, submission: str, count: int) -> list[dict]:
    """The shard tasks (``preprocessing.parallel._call_in_ray_task``) of a submission, each with its node;
    Ray reports task events asynchronously, so asked again until all ``count`` are known with a node."""
    tasks: list[dict] = []
    for _ in range(20):
        tasks = [t for t in cluster.where(submission)["tasks"] if t["name"] == "_call_in_ray_task"]
        if len(tasks) == count and all(t["node_ip"] for t in tasks):
            break
        time.sleep(1.0)
    return tasks


@pytest.mark.slow
def test_preprocessing_runs_on_several_nodes_and_matches_a_local_run(
        netns_s3_cluster: nc.NetnsCluster, raw_videos: Path, ray_preprocessed: dict, tmp_path: Path) -> None:
    """Shard tasks ran on >= 2 worker nodes (never the 0-CPU head), and every object the Ray run wrote to S3
    (shards, manifests, rejects, resume records) is byte-identical to a local single-process run's file."""
    cluster = netns_s3_cluster
    workers = {w.ip for w in cluster.workers}
    ips = []
    for split, shards in (("train", TRAIN_SHARDS), ("val", VAL_SHARDS)):
        tasks = ray_preprocessed[split]["tasks"]
        assert len(tasks) == shards and all(t["state"].endswith("FINISHED") for t in tasks), tasks
        ips += [t["node_ip"] for t in tasks]
    print(f"shard tasks per node: { {ip: ips.count(ip) for ip in sorted(set(ips))} }")
    assert set(ips) <= workers and len(set(ips)) >= 2, ips

    local = tmp_path / "local"
    for csv in ("train.csv", "validate.csv"):  # the same command, no Ray, one process, to a folder
        subprocess.run([sys.executable, *_preprocess_args(raw_videos, csv, str(local)), "--workers", "1"],
                       cwd=ROOT, check=True, capture_output=True, text=True, timeout=300)
    downloaded = tmp_path / "from-s3"
    got = cluster.exec([sys.executable, "-c", "import sys, s3fs; s3fs.S3FileSystem().get(sys.argv[1], sys.argv[2], "
                        "recursive=True)", f"{BUCKET}/shards/", f"{downloaded}/"], capture_output=True, text=True,
                       timeout=120)
    assert got.returncode == 0, got.stderr[-2000:]
    local_files = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    s3_files = sorted(str(p.relative_to(downloaded)) for p in downloaded.rglob("*") if p.is_file())
    assert s3_files == local_files, (s3_files, local_files)
    assert {"train.manifest.json", "val.manifest.json", "train-000003.tar", "val-000001.tar"} <= set(s3_files)
    differ = [name for name in local_files if not filecmp.cmp(local / name, downloaded / name, shallow=False)]
    assert not differ, f"differ from the local run: {differ}"


def _train_job(cluster: nc.NetnsCluster, runs: Path) -> tuple[subprocess.CompletedProcess, str, str]:
    submission = f"train-{uuid.uuid4().hex[:8]}"
    uri = f"sqlite:///{runs}/mlflow.db"
    started = time.monotonic()
    done = cluster.submit(["python", "pipeline/train.py", "--config", "configs/experiment/netns.yaml",
                           f"tracking.tracking_uri={uri}", "trainer.epochs=1"], working_dir=ROOT,
                          extra_args=["--submission-id", submission], timeout=600)
    print(f"training job on the cluster: {time.monotonic() - started:.1f}s")
    return done, submission, uri


@pytest.fixture(scope="module")
def trained(netns_s3_cluster: nc.NetnsCluster, ray_preprocessed: dict,
            tmp_path_factory: pytest.TempPathFactory) -> dict:
    runs = tmp_path_factory.mktemp("across-runs")
    done, submission, uri = _train_job(netns_s3_cluster, runs)
    return {"done": done, "submission": submission, "uri": uri, "runs": runs}


@pytest.mark.slow
def test_training_job_ranks_on_two_gpu_nodes_decoders_on_cpu_nodes(netns_s3_cluster: nc.NetnsCluster,
                                                                   trained: dict) -> None:
    """configs/experiment/netns.yaml submitted from the client namespace: the job succeeds; rank 0 and rank 1
    run on the two GPU-group nodes (log lines, Ray's actor table and MLflow's tag ``placement`` agree), the
    decoder actors on the CPU-group nodes, Ray Data's tasks never on the head; shards were read from and
    checkpoints (both ranks' DCP files) and the final model written to the S3 node."""
    cluster, done = netns_s3_cluster, trained["done"]
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "finished netns-demo: epoch 1" in done.stdout, done.stdout[-3000:]
    status = cluster.exec([nc.ray_executable(), "job", "status", trained["submission"]], capture_output=True,
                          text=True, timeout=120)
    assert f"Job '{trained['submission']}' succeeded" in status.stdout, status.stdout + status.stderr
    gpu = {w.ip for w in cluster.workers if w.group == nc.GPU_GROUP}
    cpu = {w.ip for w in cluster.workers if w.group == nc.CPU_GROUP}

    # each rank says where it runs (pipeline/trainer/loop.py)
    logged = dict(re.findall(r"rank (\d) of 2 on node (\d+\.\d+\.\d+\.\d+)", done.stdout))
    assert set(logged) == {"0", "1"} and set(logged.values()) == gpu, logged

    # Ray's own record of the job's actors and tasks
    where = cluster.where(trained["submission"])
    trainers = [a["node_ip"] for a in where["actors"] if a["class_name"] == "RayTrainWorker"]
    decoders = [a["node_ip"] for a in where["actors"] if a["class_name"] == "MapWorker(MapBatches(Decoder))"]
    data_tasks = [t["node_ip"] for t in where["tasks"]
                  if t["name"].startswith(("ReadMViTShards", "StreamingRepartition"))]
    print(f"trainers on {sorted(trainers)}, decoder actors on {sorted(decoders)}, data tasks on "
          f"{ {ip: data_tasks.count(ip) for ip in sorted(set(data_tasks), key=str)} }")
    assert sorted(trainers) == sorted(gpu), where["actors"]
    assert decoders and set(decoders) <= cpu, where["actors"]
    assert data_tasks and cluster.head.ip not in data_tasks, where["tasks"]

    # MLflow: the run's placement tag and artifact name the same nodes
    from mlflow.tracking import MlflowClient

    client = MlflowClient(trained["uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("netns").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"
    assert run.data.tags["placement"] == f"0:{logged['0']},1:{logged['1']}", run.data.tags
    (artifact,) = client.list_artifacts(run.info.run_id, "placement")
    recorded = json.loads(Path(client.download_artifacts(run.info.run_id, artifact.path)).read_text())
    assert artifact.path == "placement/from-step-00000000.json" and recorded["ranks"] == logged, recorded
    assert run.data.params["data.root"] == f"s3://{BUCKET}/shards" and run.data.metrics["data/failed"] == 0

    # checkpoints and the final model on the S3 node
    listing = cluster.exec([sys.executable, "-c", "import json, s3fs; print(json.dumps(s3fs.S3FileSystem().find("
                            f"'{BUCKET}/runs/netns-demo')))"], capture_output=True, text=True, timeout=120)
    objects = json.loads(listing.stdout.strip().splitlines()[-1])
    checkpoint = f"{BUCKET}/runs/netns-demo/checkpoint_epoch0001_step00000002"
    expected = {f"{checkpoint}/dcp/__0_0.distcp", f"{checkpoint}/dcp/__1_0.distcp", f"{checkpoint}/dcp/.metadata",
                f"{checkpoint}/train_state.json", f"{BUCKET}/runs/netns-demo/final_model/model.safetensors"}
    assert expected <= set(objects), sorted(objects)


@pytest.mark.slow
def test_s3_secret_reaches_no_log_mlflow_or_output(netns_s3_cluster: nc.NetnsCluster, ray_preprocessed: dict,
                                                   trained: dict) -> None:
    """The S3 credentials reach the jobs as the nodes' environment (not a runtime_env, which Ray writes to its
    runtime_env_agent.log and shows in `ray job list`): after both jobs the secret key is in no file of the
    cluster's run dir but the 0600 credentials file (every node's Ray logs and temp dirs are there), in no
    MLflow file and in no job output."""
    cluster = netns_s3_cluster
    secret = cluster.s3_env()["AWS_SECRET_ACCESS_KEY"].encode()
    places = [cluster.run_dir, trained["runs"]]
    holding = sorted(str(p) for place in places for p in place.rglob("*")
                     if p.is_file() and not p.is_symlink() and secret in p.read_bytes())
    assert holding == [str(cluster.s3_credentials_file)], holding
    outputs = [trained["done"].stdout, trained["done"].stderr, *(v["output"] for v in ray_preprocessed.values())]
    assert not [o for o in outputs if secret.decode() in o]
    jobs = cluster.exec([nc.ray_executable(), "job", "list"], capture_output=True, text=True, timeout=120)
    assert jobs.returncode == 0 and trained["submission"] in jobs.stdout and secret.decode() not in jobs.stdout


@pytest.mark.slow
def test_stop_leaves_nothing_of_the_cluster_and_its_s3_node(netns_s3_cluster: nc.NetnsCluster) -> None:
    """Runs last in this module: it stops the shared cluster (the fixture's own stop is then a no-op)."""
    cluster = netns_s3_cluster
    assert cluster.s3 is not None and cluster.s3.pid and nc._alive(cluster.s3.pid)
    fds = [os.open(f"/run/netns/{n}", os.O_RDONLY) for n in cluster.namespaces]
    try:
        inodes = {(os.fstat(fd).st_dev, os.fstat(fd).st_ino) for fd in fds}
        started = time.monotonic()
        cluster.stop(grace_s=5.0)
        print(f"stop took {time.monotonic() - started:.1f}s")
        assert cluster.leftovers() == {"namespaces": [], "links": [], "pids": []}
        left = []
        for entry in filter(str.isdigit, os.listdir("/proc")):
            try:
                st = os.stat(f"/proc/{entry}/ns/net")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in inodes:
                left.append(int(entry))
        assert not left, f"processes left in the cluster's (deleted) namespaces: {left}"
    finally:
        for fd in fds:
            os.close(fd)
    assert not [n for n in nc.list_namespaces() if n.startswith(cluster.prefix)]
    assert not cluster.state_file.exists() and not cluster.run_dir.exists()
