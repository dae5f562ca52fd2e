"""Security cases: untrusted checkpoints, secrets in outputs, path traversal through tar members and
file names, the local Ray cluster's network exposure, and Ray token auth in the Kubernetes manifests.

Each attack is made real before it is refused: the pickled payload really creates its marker file when
loaded the unsafe way, the crafted tar really holds `../` and absolute member names and links.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.models.convert import UnsafeCheckpoint, load_checkpoint_file, load_weights, to_torchvision
from pipeline.models.mvit import MViT
from tests.models.helpers import tiny_config

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "experiment" / "demo.yaml"
PROJECT_CODE = [REPO / "pipeline", REPO / "preprocessing", REPO / "benchmarks", REPO / "scripts"]
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


# -- untrusted checkpoints ---------------------------------------------------------------------------------------

class _Payload:
    """Unpickling this creates ``marker``: the stand-in for arbitrary code in a malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # noqa: ANN204
        return (open, (self.marker, "w"))


def _checkpoint_body(layout: str, marker: Path) -> Any:
    """A checkpoint in the given layout with the payload hidden where such files carry extra objects."""
    torch.manual_seed(0)
    state = MViT(tiny_config(1)).state_dict()
    payload = _Payload(marker)
    if layout == "native":
        return {**state, "extra_state": payload}
    if layout == "slowfast":  # {"model_state", "optimizer_state", "epoch", "cfg"}; the cfg is a pickled object
        return {"model_state": state, "optimizer_state": {}, "epoch": 3, "cfg": payload}
    if layout == "torchvision":
        return {**to_torchvision(state), "_metadata": payload}
    if layout == "pytorchvideo":  # model-zoo files: {"model_state": ...} with PyTorchVideo names
        return {"model_state": {"patch_embed.patch_model.weight": torch.zeros(16, 3, 3, 7, 7),
                                "cls_positional_encoding.cls_token": payload}}
    raise ValueError(layout)


def _write(layout: str, path: Path, marker: Path, serialisation: str) -> None:
    body = _checkpoint_body(layout, marker)
    if serialisation == "zip":
        torch.save(body, path)
    elif serialisation == "legacy":
        torch.save(body, path, _use_new_zipfile_serialization=False)
    else:  # a bare pickle named .pth, as some repositories ship them
        with open(path, "wb") as f:
            pickle.dump(body, f)


@pytest.mark.parametrize("serialisation", ["zip", "legacy", "raw-pickle"])
@pytest.mark.parametrize("layout", ["native", "slowfast", "torchvision", "pytorchvideo"])
def test_imported_weights_with_pickled_code_are_refused(tmp_path, layout, serialisation):
    """Imported weights holding pickled code are refused, naming the file; the code never runs."""
    path, marker = tmp_path / f"evil_{layout}.pth", tmp_path / "PWNED"
    _write(layout, path, marker, serialisation)
    # The attack is real: the unrestricted loader runs the payload.
    control = tmp_path / "control.pth"
    _write(layout, control, tmp_path / "control-marker", serialisation)
    if serialisation == "raw-pickle":
        pickle.loads(control.read_bytes())
    else:
        torch.load(control, weights_only=False)
    assert (tmp_path / "control-marker").exists()

    for load in (lambda: load_weights(MViT(tiny_config(1)), path), lambda: load_checkpoint_file(path)):
        with pytest.raises(UnsafeCheckpoint) as caught:
            load()
        message = str(caught.value)
        assert str(path) in message and "refused" in message and "\n" not in message, message
    assert not marker.exists(), "the checkpoint's payload ran"


def test_every_torch_load_in_the_project_is_weights_only():
    """Every torch.load in the project uses weights_only=True; nothing else unpickles files."""
    calls = []
    for root in PROJECT_CODE:
        for path in root.rglob("*.py"):
            text = path.read_text()
            for match in re.finditer(r"torch\.load\(", text):
                call = text[match.start(): text.find("\n", text.find(")", match.start()))]
                calls.append((path.relative_to(REPO), call))
    assert calls, "no torch.load found at all: the scan is broken"
    unsafe = [(str(p), c) for p, c in calls if "weights_only=True" not in c]
    assert not unsafe, unsafe
    unpickling = [str(p.relative_to(REPO)) for root in PROJECT_CODE for p in root.rglob("*.py")
                  if re.search(r"\bpickle\.loads?\(|\bjoblib\.load\(|\bdill\.load", p.read_text())]
    assert not unpickling, f"plain unpickling of files in {unpickling}"


def _tiny_trained(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = MViT(tiny_config(1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(1, 3, 4, 32, 32)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_dcp_restore_refuses_pickled_code_in_metadata(tmp_path):
    """DCP restore refuses pickled code in .metadata, naming the file; the code never runs."""
    from torch.distributed.checkpoint import FileSystemReader

    from pipeline.trainer.checkpoint import TrainState, load_checkpoint, save_checkpoint

    model, optimizer = _tiny_trained()
    good, evil, marker = tmp_path / "good", tmp_path / "evil", tmp_path / "PWNED"
    save_checkpoint(good, model, optimizer, TrainState(epoch=2))
    fresh, fresh_opt = _tiny_trained(seed=1)
    assert load_checkpoint(good, fresh, fresh_opt).epoch == 2  # a genuine checkpoint still restores
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))

    shutil.copytree(good, evil)
    (evil / "dcp" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    # The attack is real: stock DCP reads .metadata with pickle.load.
    control = tmp_path / "control"
    shutil.copytree(evil, control)
    (control / "dcp" / ".metadata").write_bytes(pickle.dumps(_Payload(tmp_path / "control-marker")))
    FileSystemReader(str(control / "dcp")).read_metadata()
    assert (tmp_path / "control-marker").exists()

    with pytest.raises(UnsafeCheckpoint, match=re.escape(str(evil / "dcp" / ".metadata"))):
        load_checkpoint(evil, *_tiny_trained(seed=1))
    assert not marker.exists(), "the checkpoint's payload ran"


def test_dcp_restore_refuses_pickled_code_in_a_saved_value(tmp_path):
    """DCP restore refuses pickled code in a saved value (optimiser settings); the code never runs."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from pipeline.trainer.checkpoint import DCP_DIR, TRAIN_STATE_FILE, load_checkpoint

    model, optimizer = _tiny_trained()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    marker = tmp_path / "PWNED"
    optim_sd["param_groups"][0]["lr"] = _Payload(marker)  # DCP stores non-tensors with torch.save (BYTE_IO)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp_path / "evil" / DCP_DIR))
    (tmp_path / "evil" / TRAIN_STATE_FILE).write_text(json.dumps({"epoch": 1}))

    with pytest.raises(UnsafeCheckpoint, match=r"evil.*optim\.param_groups\.0\.lr"):
        load_checkpoint(tmp_path / "evil", *_tiny_trained(seed=1))
    assert not marker.exists(), "the checkpoint's payload ran"


# The one place that writes tar members to disk: the Kinetics downloader unpacks the release's .tar.gz
# parts, member by member, after its own refusals and through tarfile's data filter (tested on hostile
# archives in tests/preprocessing/test_download.py). Shards are never extracted: the data service and
# preprocessing read their members in memory.
_DOWNLOAD_EXTRACT = "preprocessing/download/extract.py"


def test_nothing_in_the_project_extracts_tars_to_disk_but_the_downloader_with_the_data_filter():
    """No project code extracts tar members to disk, except the downloader, only with the data filter."""
    pattern = r"\.extractall\(|\.extract\((?!file)|shutil\.unpack_archive"
    offenders = [str(p.relative_to(REPO)) for root in PROJECT_CODE for p in root.rglob("*.py")
                 if re.search(pattern, p.read_text())]
    assert offenders == [_DOWNLOAD_EXTRACT], offenders
    calls = re.findall(r"[\w.]*(?:\.extractall|\.extract|unpack_archive)\([^)]*\)", (REPO / _DOWNLOAD_EXTRACT).read_text())
    assert calls and all('filter="data"' in call and "extractall" not in call for call in calls), calls


# -- secrets never appear in logs, MLflow, manifests, saved configs, checkpoints ---------------------------------

_UID = uuid.uuid4().hex[:10]
PLANTED_ENV = {
    "AWS_ACCESS_KEY_ID": f"AKIAPLANTED{_UID.upper()}",
    "AWS_SECRET_ACCESS_KEY": f"PLANTEDawsSecret{_UID}",
    "AWS_SESSION_TOKEN": f"PLANTEDsessionToken{_UID}",
    "MLFLOW_TRACKING_PASSWORD": f"PLANTEDmlflowPassword{_UID}",
    "MVIT_SERVICE_TOKEN": f"PLANTEDserviceToken{_UID}",
    "RAY_AUTH_TOKEN": f"PLANTEDrayAuthToken{_UID}",  # the local Ray started by the job uses it as its token
}
PLANTED_CONFIG = {
    "tag named like a password": f"PLANTEDtagPassword{_UID}",
    "password in an endpoint URL": f"PLANTEDurlPassword{_UID}",
}
PLANTED = {**PLANTED_ENV, **PLANTED_CONFIG}


def _secret_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PLANTED_ENV, PYTHONPATH=str(REPO), AWS_EC2_METADATA_DISABLED="true",
               AWS_CONFIG_FILE="/nonexistent/aws-config", AWS_SHARED_CREDENTIALS_FILE="/nonexistent/aws-credentials")
    return env


def _files(root: Path) -> dict[str, bytes]:
    out = {}
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_size < 64 << 20:
            out[str(path)] = path.read_bytes()
    return out


def _run(args: list[str], env: dict[str, str], cwd: Path = REPO, timeout: float = 300) -> dict[str, bytes]:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, timeout=timeout)
    assert done.returncode == 0, (done.stdout + done.stderr).decode(errors="replace")[-3000:]
    return {f"stdout of {' '.join(args[1:4])}": done.stdout, f"stderr of {' '.join(args[1:4])}": done.stderr}


@pytest.fixture(scope="module")
def secret_shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    """Tiny Kinetics shards made by the CLI with planted secrets in its environment, and its output."""
    root = tmp_path_factory.mktemp("secret_shards")
    raw, out, env = root / "raw", root / "shards", _secret_env()
    outputs = _run([sys.executable, "-m", "preprocessing", "synth", "kinetics", "--out", str(raw), "--classes", "2",
                    "--per-class", "2", "--val-per-class", "1", "--seconds", "2", "--size", "96x72", "--fps", "15"], env)
    for name in ("train.csv", "validate.csv"):
        outputs.update({f"{k} ({name})": v for k, v in _run(
            [sys.executable, "-m", "preprocessing", "kinetics", "--csv", str(raw / "annotations" / name), "--videos",
             str(raw), "--out", str(out), "--short-side", "72", "--shard-samples", "2", "--workers", "1"], env).items()})
    return out, outputs


def test_preprocessing_writes_no_secret_to_shards_manifests_rejects_or_logs(secret_shards, s3_bucket, ledger):
    """Preprocessing (local, S3) puts no planted secret in shards, manifests, rejects or logs."""
    import s3fs

    shards, outputs = secret_shards
    env = _secret_env()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):  # moto accepts any keys
        assert env[name] == PLANTED_ENV[name]
    raw = shards.parent / "raw"
    outputs.update(_run([sys.executable, "-m", "preprocessing", "kinetics", "--csv", str(raw / "annotations" / "train.csv"),
                         "--videos", str(raw), "--out", s3_bucket.url, "--s3-endpoint-url", s3_bucket.endpoint_url,
                         "--short-side", "72", "--shard-samples", "2", "--workers", "1"], env))
    outputs.update(_run([sys.executable, "-m", "preprocessing", "verify", s3_bucket.url, "--split", "train",
                         "--s3-endpoint-url", s3_bucket.endpoint_url], env))
    fs = s3fs.S3FileSystem(**s3_bucket.storage_options)
    fs.invalidate_cache()
    bucket_root = s3_bucket.url.removeprefix("s3://")
    objects = {f"s3://{p}": fs.cat_file(p) for p in fs.find(bucket_root)}
    assert any(k.endswith("train.manifest.json") for k in objects) and any(k.endswith(".tar") for k in objects)
    assert (shards / "train.manifest.json").is_file() and (shards / "val.rejects.jsonl").is_file()
    ledger.account_text({**outputs, **_files(shards), **objects}, PLANTED)


class _ListenerWatch(threading.Thread):
    """Records every TCP listening socket of a process tree while it runs (polled once a second)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.stop, self.seen = pid, threading.Event(), {}

    def run(self) -> None:
        while not self.stop.wait(1.0):
            self.seen.update(_listeners([self.pid]))


def _listeners(root_pids: list[int], pgid: int | None = None) -> dict[tuple[str, int], str]:
    """(ip, port) -> process name of every TCP listener in the process trees of ``root_pids`` (and of
    every process in process group ``pgid``)."""
    import psutil

    procs: dict[int, psutil.Process] = {}
    for pid in root_pids:
        try:
            root = psutil.Process(pid)
            for proc in [root, *root.children(recursive=True)]:
                procs[proc.pid] = proc
        except psutil.NoSuchProcess:
            pass
    if pgid is not None:
        for proc in psutil.process_iter():
            try:
                if os.getpgid(proc.pid) == pgid:
                    procs[proc.pid] = proc
            except (ProcessLookupError, psutil.Error):
                pass
    found = {}
    for proc in procs.values():
        try:
            name = " ".join(Path(arg).name for arg in proc.cmdline()[:2]) or proc.name()
            for conn in proc.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN:
                    found[(conn.laddr.ip, conn.laddr.port)] = name
        except psutil.Error:
            pass
    return found


@pytest.mark.slow
def test_training_job_writes_no_secret_to_mlflow_checkpoints_configs_or_logs(secret_shards, tmp_path, ledger):
    """Training puts no planted secret in MLflow, checkpoints, configs or logs; its Ray is loopback-only."""
    shards, _ = secret_shards
    runs = tmp_path / "runs"
    ray_tmp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: Ray's socket paths must stay < 108 bytes
    uri = f"sqlite:///{runs}/mlflow.db"
    env = {**_secret_env(), "RAY_TMPDIR": str(ray_tmp)}
    overrides = {
        "data.root": shards, "trainer.storage_path": runs, "tracking.tracking_uri": uri,
        "trainer.epochs": 1, "trainer.eval_every_epochs": 1, "data.sampling.eval_clips": 1, "data.batch_size": 2,
        "data.eval_batch_size": 2, "optim.reference_batch_size": 2, "data.decoder.num_cpus": 0.25,
        "trainer.cpus_per_worker": 0.5, "tracking.log_every_steps": 1, "tracking.log_system_metrics": "false",
        "tracking.tags.db_password": PLANTED["tag named like a password"],
        "tracking.tags.team_note": f"rotated key {PLANTED_ENV['AWS_SECRET_ACCESS_KEY']}",
        "data.s3_endpoint_url": f"http://mvit:{PLANTED['password in an endpoint URL']}@127.0.0.1:9",
    }
    cmd = [sys.executable, "pipeline/train.py", "--config", str(DEMO), *(f"{k}={v}" for k, v in overrides.items())]
    try:
        with open(tmp_path / "stdout", "wb") as out, open(tmp_path / "stderr", "wb") as err:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err)
            watch = _ListenerWatch(proc.pid)
            watch.start()
            try:
                returncode = proc.wait(timeout=900)
            finally:
                watch.stop.set()
                watch.join()
        logs = {"driver stdout": (tmp_path / "stdout").read_bytes(), "driver stderr": (tmp_path / "stderr").read_bytes()}
        assert returncode == 0, logs["driver stderr"].decode(errors="replace")[-4000:]
        ray_files = _files(ray_tmp)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("demo").experiment_id])
    params, tags = run.data.params, run.data.tags
    # Redacted, not merely absent: the secret-looking values reached MLflow as ***.
    assert params["tracking.tags.db_password"] == "***" and tags["db_password"] == "***"
    assert tags["team_note"] == "rotated key ***"
    assert params["data.s3_endpoint_url"] == "http://mvit:***@127.0.0.1:9"
    mlflow_text = {"MLflow params and tags": json.dumps([params, tags]).encode()}
    artifacts = _files(runs / "mlartifacts")
    assert any(p.endswith("resolved_config.yaml") for p in artifacts) and any(p.endswith(".manifest.json") for p in artifacts)
    checkpoints = [p for p in _files(runs) if p.endswith("train_state.json")]
    assert checkpoints, "no checkpoint written"
    assert any("session_" in p and "/logs/" in p for p in ray_files), "Ray's session logs were not captured"

    ledger.account_text({**logs, **mlflow_text, **_files(runs), **ray_files}, PLANTED)
    # The job's private Ray (python pipeline/train.py without RAY_ADDRESS) listened on loopback only.
    exposed = {addr: name for addr, name in watch.seen.items() if addr[0] not in LOOPBACK}
    assert watch.seen and not exposed, f"listening beyond loopback: {exposed}"


# -- tar member names and file names cannot escape any output folder ---------------------------------------------

def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _clip_id(youtube_id: str, start: int, end: int) -> str:
    return f"{youtube_id}_{start:06d}_{end:06d}"


HOSTILE_IDS = ["../../../escaped", "/tmp/mvit-abs-escape", "a/../../b", "..", "x\x00y", "spa ce;$(touch pwn)",
               "-rf", "vidéo_ünï", "new\nline", "%2e%2e%2fenc", "C:\\windows\\evil", "." * 3]
_FILE_NAMES_OK = ["spa ce;$(touch pwn)", "-rf", "vidéo_ünï", "new\nline", "%2e%2e%2fenc", "C:\\windows\\evil", "..."]


def _samples_written(out: Path, split: str) -> list[tuple[str, str]]:
    """(member name, meta source id + segment) of every sample in the split's tars."""
    found = []
    for path in sorted(out.glob(f"{split}-*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                assert member.isreg() and re.fullmatch(r"[A-Za-z0-9_-]+\.[a-z0-9]+", member.name), member.name
                if member.name.endswith(".json"):
                    found.append((member.name, json.loads(tar.extractfile(member).read())))
    return found


def test_hostile_kinetics_ids_stay_inside_the_output(tmp_path, ledger):
    """Hostile Kinetics ids (../, /abs, NUL, odd chars) become safe keys or rejects; nothing escapes."""
    from preprocessing.synth import SynthKinetics, synth_kinetics

    raw, out = tmp_path / "raw", tmp_path / "work" / "out"
    synth_kinetics(SynthKinetics(str(raw), classes=2, per_class=1, val_per_class=0, seconds=1, fps=8, width=32,
                                 height=24))
    csv_path = raw / "annotations" / "train.csv"
    rows = list(csv.DictReader(csv_path.open()))
    template = next(raw.rglob("*.mp4"))
    label = rows[0]["label"]
    for youtube_id in HOSTILE_IDS:
        rows.append({**rows[0], "youtube_id": youtube_id, "time_start": "0", "time_end": "1", "label": label})
        if youtube_id in _FILE_NAMES_OK:  # a video file with that name exists: the row must be encoded
            shutil.copy(template, raw / "train" / f"{_clip_id(youtube_id, 0, 1)}.mp4")
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    before = _tree(tmp_path)
    done = subprocess.run([sys.executable, "-m", "preprocessing", "kinetics", "--csv", str(csv_path), "--videos", str(raw),
                           "--out", str(out), "--short-side", "24", "--shard-samples", "4", "--workers", "1",
                           "--no-progress"], cwd=out.parent.parent, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    created = {p for p in _tree(tmp_path) - before if not p.startswith("work/out")} - {"work"}
    assert not created, f"written outside the output folder: {created}"
    assert not Path("/tmp/mvit-abs-escape_000000_000001.mp4").exists()

    inputs = [_clip_id(r["youtube_id"], int(float(r["time_start"])), int(float(r["time_end"]))) for r in rows]
    by_line = {f"{csv_path}:{n}": clip for n, clip in enumerate(inputs, start=2)}  # malformed rows: "{csv}:{line}"
    delivered = [_clip_id(meta["source_id"], *map(int, meta["segment"])) for _, meta in _samples_written(out, "train")]
    rejects = [json.loads(line) for line in (out / "train.rejects.jsonl").read_text().splitlines()]
    assert all(r["reason"] for r in rejects)
    ledger.account(inputs, delivered, [by_line.get(r["source"], r["source"]) for r in rejects])
    assert {_clip_id(i, 0, 1) for i in _FILE_NAMES_OK} <= set(delivered), "hostile but valid names must be encoded"


def test_hostile_split_name_is_refused_before_writing(tmp_path):
    """A split name that is a path (../../x) is refused before anything is written."""
    from preprocessing.synth import SynthKinetics, synth_kinetics

    raw, out = tmp_path / "raw", tmp_path / "a" / "b" / "out"
    synth_kinetics(SynthKinetics(str(raw), classes=1, per_class=1, val_per_class=0, seconds=1, fps=8, width=32, height=24))
    csv_path = raw / "annotations" / "hostile.csv"
    text = (raw / "annotations" / "train.csv").read_text().replace(",train", ",../../escaped")
    csv_path.write_text(text)
    before = _tree(tmp_path)
    done = subprocess.run([sys.executable, "-m", "preprocessing", "kinetics", "--csv", str(csv_path), "--videos", str(raw),
                           "--out", str(out), "--shard-samples", "4", "--workers", "1", "--no-progress"],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode != 0 and "split name '../../escaped'" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert _tree(tmp_path) - before <= {"a", "a/b", "a/b/out"}, _tree(tmp_path) - before


def test_hostile_imagenet_file_names_stay_inside_the_output(tmp_path, ledger):
    """Hostile ImageNet file names become safe keys inside the output; nothing escapes."""
    from PIL import Image

    root, out = tmp_path / "in1k", tmp_path / "work" / "out"
    names = ["..evil", "...", "-rf", "spa ce;$(touch pwn)", "new\nline", "ünïcödé", "%2e%2e%2f", "a" * 200, "normal"]
    for i, wnid in enumerate(["n0001", "n0002"]):
        folder = root / "train" / wnid
        folder.mkdir(parents=True)
        for name in names:
            Image.new("RGB", (24, 16), (40 * i, 80, 120)).save(folder / f"{name}{i}.JPEG")
    (root / "train" / "n0001" / "broken0.JPEG").write_bytes(b"not a jpeg")
    before = _tree(tmp_path)
    done = subprocess.run([sys.executable, "-m", "preprocessing", "imagenet", "--root", str(root), "--split", "train",
                           "--out", str(out), "--shard-samples", "8", "--workers", "1", "--no-progress"],
                          cwd=out.parent.parent, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    created = {p for p in _tree(tmp_path) - before if not p.startswith("work/out")} - {"work"}
    assert not created, f"written outside the output folder: {created}"
    inputs = [f"{n}{i}" for i in range(2) for n in names] + ["broken0"]
    delivered = [meta["source_id"] for _, meta in _samples_written(out, "train")]
    rejects = [Path(json.loads(line)["source"]).stem for line in (out / "train.rejects.jsonl").read_text().splitlines()]
    ledger.account(inputs, delivered, rejects)


def _member(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


@pytest.fixture
def hostile_shard(secret_shards, tmp_path) -> tuple[Path, list[str], Path]:
    """A split whose only shard holds one genuine sample and five hostile ones, with a correct manifest."""
    from core.manifest import Manifest, ShardInfo, format_digest, keys_digest, load_manifest

    shards, _ = secret_shards
    with tarfile.open(shards / "train-000000.tar") as tar:
        genuine = {m.name.split(".", 1)[1]: tar.extractfile(m).read() for m in tar.getmembers()[:3]}
    victim = tmp_path / "victim.txt"
    victim.write_text("untouched")
    out = tmp_path / "a" / "b" / "shards"
    out.mkdir(parents=True)
    buffer = io.BytesIO()
    keys = ["good", "../../escaped", "/tmp/mvit-abs-member", "link", "hard", "sub/dir"]
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for key in keys:
            for ext in ("mp4", "cls", "json"):
                name, data = f"{key}.{ext}", genuine[ext]
                if key == "link" and ext == "mp4":
                    _member(tar, name, kind=tarfile.SYMTYPE, link=str(victim))
                elif key == "hard" and ext == "mp4":
                    _member(tar, name, kind=tarfile.LNKTYPE, link="good.mp4")
                else:
                    _member(tar, name, data)
    data = buffer.getvalue()
    (out / "train-000000.tar").write_bytes(data)
    import hashlib

    template = load_manifest(str(shards), "train")
    manifest = Manifest(dataset="kinetics", split="train", modality="video", classes=template.classes,
                        num_inputs=len(keys), num_samples=len(keys), num_rejected=0, total_bytes=len(data),
                        shards=[ShardInfo("train-000000.tar", len(keys), len(data), hashlib.sha256(data).hexdigest(),
                                          format_digest(keys_digest(keys)))],
                        tool_version="crafted", settings={})
    (out / "train.manifest.json").write_text(manifest.to_json())
    (out / "train.rejects.jsonl").write_text("")
    return out, keys, victim


def _no_escape(root: Path, out: Path, victim: Path, before: set[str]) -> None:
    assert _tree(root) == before, _tree(root) ^ before
    assert victim.read_text() == "untouched"
    for target in (out / "../../escaped.mp4", out.parent / "escaped.mp4", Path("/tmp/mvit-abs-member.mp4")):
        assert not target.exists(), target


def test_crafted_shard_is_refused_by_verify_without_writing_anything(hostile_shard, tmp_path):
    """`verify` reports ../, absolute, symlink and hard-link members and writes nothing."""
    out, _, victim = hostile_shard
    before = _tree(tmp_path)
    done = subprocess.run([sys.executable, "-m", "preprocessing", "verify", str(out), "--split", "train"], cwd=out,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 1, done.stdout + done.stderr
    for problem in ("unsafe member name '../../escaped.mp4'", "unsafe member name '/tmp/mvit-abs-member.mp4'",
                    "member 'link.mp4' is a symbolic link", "member 'hard.mp4' is a hard link",
                    "unsafe member name 'sub/dir.mp4'"):
        assert problem in done.stdout, done.stdout
    _no_escape(tmp_path, out, victim, before)


def test_crafted_shard_read_by_the_data_service_skips_and_counts_hostile_samples(hostile_shard, tmp_path, ray_cluster,
                                                                                 ledger):  # fmt: skip
    """The data service skips and counts samples with ../, absolute or link members; the epoch checks out; writes nothing."""
    from pipeline.trainer.validation import check_epoch_counts, check_epoch_identity
    from tests.data.data_helpers import epoch_through_service

    out, keys, victim = hostile_shard
    before = _tree(tmp_path)
    delivered, total, _ = epoch_through_service(out)
    failed = dict(total.failures)
    assert delivered == ["good"]
    for key in ("../../escaped", "/tmp/mvit-abs-member", "sub/dir"):
        assert "unsafe member name" in failed[key], failed
    assert "is a symbolic link" in failed["link"] and "is a hard link" in failed["hard"], failed
    # The epoch adds up: 1 delivered + 5 FAILED of 6. A crafted member name can never be a manifest key
    # (preprocessing writes [A-Za-z0-9_-] keys only), so the three unsafe ones are counted apart
    # (``unkeyed``) and the epoch is checked by its counts; its key identity cannot be.
    assert (total.samples, total.failed, total.unkeyed, total.expected) == (1, 5, 3, 6), total
    check_epoch_counts(total, "epoch 0")
    assert not check_epoch_identity(total, "epoch 0")
    ledger.account(keys, delivered, failed)
    _no_escape(tmp_path, out, victim, before)


# -- the local Ray cluster is reachable from this machine only, and only with the token ---------------------------

def _http(url: str, token: str | None, body: dict | None = None) -> int:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    data = json.dumps(body).encode() if body is not None else None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.mark.slow
def test_local_ray_cluster_listens_on_loopback_only_and_requires_the_token(tmp_path):
    """The local Ray cluster listens on 127.0.0.1 only; its job API refuses a missing or wrong token."""
    from pipeline import local_cluster

    token_file = tmp_path / "ray_token"
    marker = tmp_path / "job-running"
    ray_tmp = Path(tempfile.mkdtemp(prefix="rl", dir="/tmp"))
    cluster = local_cluster.start(num_cpus=2, token_file=token_file, object_store_mb=100, temp_dir=str(ray_tmp))
    try:
        token = token_file.read_text().strip()
        script = ("import pathlib, time, ray; ray.init(); "
                  "A = ray.remote(num_cpus=0)(type('A', (), {'f': lambda self: 1})); a = A.remote(); "
                  "ray.get([a.f.remote(), ray.remote(num_cpus=1)(lambda: 1).remote()]); "
                  f"pathlib.Path({str(marker)!r}).touch(); time.sleep(120)")
        job = {"entrypoint": f'python -c "{script}"'}
        jobs_api = f"{cluster.dashboard_url}/api/jobs/"
        assert _http(jobs_api, None) == 401 and _http(jobs_api, "0" * 64) == 403
        assert _http(jobs_api, None, job) == 401 and _http(jobs_api, "0" * 64, job) == 403
        deadline = time.monotonic() + 120
        while (status := _http(jobs_api, token, job)) != 200 and time.monotonic() < deadline:
            time.sleep(2)  # the job agent registers a few seconds after the head answers
        assert status == 200
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(1)
        assert marker.exists(), "the job (driver, actor, task) never ran"
        listening = _listeners([cluster.pgid], pgid=cluster.pgid)
    finally:
        cluster.stop(grace_s=5)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    names = " | ".join(sorted(set(listening.values())))
    for process in ("gcs_server", "raylet", "dashboard", "ray::A", "ray::JobSupervisor"):
        assert process in names, f"{process} not among the listeners: {names}"
    exposed = {addr: name for addr, name in listening.items() if addr[0] not in LOOPBACK}
    assert not exposed, f"listening beyond loopback: {exposed}"


# -- Kubernetes: every Ray cluster runs with token auth from a Secret --------------------------------------------

@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_every_k8s_ray_cluster_enables_token_auth_from_a_secret(overlay):
    """Every k8s Ray cluster enables token auth; every Ray container gets the token from a Secret."""
    from tests.k8s.k8s_manifests import cluster_spec, containers, env_of, is_ray, pod_templates, render

    docs = render(overlay)
    ray_docs = [d for d in docs if is_ray(d) and d["kind"] in ("RayJob", "RayCluster")]
    assert {d["kind"] for d in ray_docs} == {"RayJob", "RayCluster"}, [d["kind"] for d in ray_docs]
    secrets = {d["metadata"]["name"] for d in docs if d["kind"] == "Secret"}
    for doc in ray_docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        auth = cluster_spec(doc).get("authOptions", {})
        assert auth.get("mode") == "token" and auth.get("secretName"), f"{name}: no token auth ({auth})"
        assert auth["secretName"] not in secrets, f"{name}: the token Secret must be created out of band, not rendered"
        for where, template in pod_templates(doc):
            for container in containers(template):
                env = env_of(container)
                token = env.get("RAY_AUTH_TOKEN")
                assert token is not None, f"{where}/{container['name']}: no RAY_AUTH_TOKEN"
                assert "value" not in token, f"{where}/{container['name']}: RAY_AUTH_TOKEN is a literal"
                assert token["valueFrom"]["secretKeyRef"]["name"] == auth["secretName"], where
                assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{where}: RAY_AUTH_MODE is not token"
        runtime_env = str(doc["spec"].get("runtimeEnvYAML", ""))
        assert "RAY_AUTH_TOKEN" not in runtime_env and "auth_token" not in runtime_env, name
