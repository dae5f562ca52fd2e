"""Bad input before any work: invalid configs and flags, missing or wrong S3 credentials, unreachable storage.

Every refusal must come before the expensive part starts (no Ray, no transcoding), as one line that names
what is wrong and where it came from (the key and the file or the command line; the URL), within a bounded
time, and without printing a secret.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "experiment" / "demo.yaml"
PLANTED_SECRET = "PLANTEDsecretAbc123xyz"  # a secret access key that must never be printed
BOUND_S = 60.0  # an unusable store must be reported within this many seconds


def _nested(key: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    node = out
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return out


def _override(key: str, value: Any) -> str:
    text = json.dumps(value) if isinstance(value, list) else ("null" if value is None else str(value))
    return f"{key}={text}"


# (key, bad value, what the message must say besides the key). Top level, sections and nested sections;
# unknown keys, wrong types, zero / negative sizes and out-of-range values.
BAD_VALUES = [
    ("epochs", 3, "not in 'ExperimentConfig'"),
    ("trainer.epocs", 3, "Did you mean"),
    ("data.sampling.nframes", 8, "not in 'SamplingConfig'"),
    ("trainer", 5, "Merge error"),
    ("trainer.epochs", "many", "could not be converted"),
    ("trainer.use_gpu", "maybe", "not a valid bool"),
    ("optim.lr", "fast", "could not be converted"),
    ("optim.betas", [0.9], "length 1"),
    ("data.augment.mean", 0.5, ""),
    ("trainer.epochs", 0, "must be >= 1, got 0"),
    ("trainer.epochs", -3, "must be >= 1, got -3"),
    ("trainer.num_workers", 0, "must be >= 1"),
    ("trainer.grad_accum_steps", 0, "must be >= 1"),
    ("trainer.cpus_per_worker", 0, "must be > 0"),
    ("trainer.checkpoint_every_steps", -5, "must be >= 0"),
    ("trainer.precision", "fp8", "auto, fp32 or bf16"),
    ("data.batch_size", 0, "must be >= 1"),
    ("data.batch_size", -8, "must be >= 1, got -8"),
    ("data.eval_batch_size", 0, "must be >= 1"),
    ("data.sampling.num_frames", 0, "must be >= 1"),
    ("data.sampling.stride", -1, "must be >= 1"),
    ("data.sampling.eval_clips", 0, "must be >= 1"),
    ("data.augment.crop_size", 0, "must be >= 1"),
    ("data.augment.label_smoothing", 1.0, "[0, 1)"),
    ("data.decoder.min_actors", 0, "must be >= 1"),
    ("data.shuffle.interleave", 0, "must be >= 1"),
    ("data.train_split", "../x", "[A-Za-z0-9_-]+"),
    ("data.s3_endpoint_url", "ftp://store", "http:// or https://"),
    ("optim.lr", 0, "must be > 0"),
    ("optim.lr", -0.001, "must be > 0"),
    ("optim.min_lr", -1, "must be in [0"),
    ("optim.reference_batch_size", 0, "must be >= 1"),
    ("optim.weight_decay", -0.1, "must be >= 0"),
    ("optim.clip_grad_norm", 0, "must be > 0"),
    ("model.num_frames", 0, "must be >= 1"),
    ("model.crop_size", 0, "must be >= 1"),
    ("model.depth", 0, "must be >= 1"),
    ("model.num_heads", 0, "must be >= 1"),
    ("model.preset", "mvit_huge", "unknown MViT preset"),
    ("tracking.log_every_steps", 0, "must be >= 1"),
    ("name", "../escape", "plain folder name"),
    ("seed", -1, "must be >= 0"),
]
_IDS = [f"{key}={value}" for key, value, _ in BAD_VALUES]


def _refusal(path: Path | None, overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(path, overrides)
    message = str(caught.value)
    assert "\n" not in message, f"not one line: {message!r}"
    return message


@pytest.mark.parametrize(("key", "value", "says"), BAD_VALUES, ids=_IDS)
def test_bad_config_value_in_a_yaml_file_is_refused_naming_key_and_file(tmp_path, key, value, says):
    """A bad value in the YAML file is refused before any work, naming the key and the file."""
    body = _nested(key, value)
    body.setdefault("data", {}).setdefault("root", "/shards")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(body))
    # An unrelated, valid override must not make the message blame the command line.
    message = _refusal(bad, ["tracking.experiment=bad-config-test"])
    assert key in message and says in message, message
    assert f"from {bad}" in message and "command line" not in message, message


@pytest.mark.parametrize(("key", "value", "says"), BAD_VALUES, ids=_IDS)
def test_bad_config_value_on_the_command_line_is_refused_naming_key_and_command_line(key, value, says):
    """A bad command-line override is refused before any work, naming the key and the command line."""
    message = _refusal(DEMO, ["data.root=/shards", _override(key, value)])
    assert key in message and says in message, message
    assert "from the command line" in message, message


def test_a_bad_file_value_that_the_command_line_overrides_is_accepted(tmp_path):
    """A bad file value replaced by a command-line override is accepted."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"trainer": {"epochs": 0}, "data": {"root": "/shards"}}))
    assert load_config(bad, ["trainer.epochs=3"]).trainer.epochs == 3


@pytest.mark.parametrize(("text", "says"), [
    ("trainer:\n  epochs: [1\n", "not valid YAML at line 3"),
    ("trainer:\n\tepochs: 1\n", "not valid YAML at line 2"),
    ("- a\n- b\n", "must be a mapping"),
], ids=["unclosed-list", "tab-indent", "top-level-list"])
def test_malformed_yaml_is_one_line_naming_the_file(tmp_path, text, says):
    """Malformed YAML is one line naming the file and line, not a traceback."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    message = _refusal(bad, [])
    assert str(bad) in message and says in message, message


@pytest.mark.parametrize("item", ["trainer.epochs", "=3"])
def test_an_override_without_key_or_value_is_refused(item):
    """An override that is not key.path=value is refused, naming it."""
    message = _refusal(DEMO, ["data.root=/shards", item])
    assert "command line" in message and repr(item) in message, message


def test_train_script_exits_non_zero_with_one_line_and_no_traceback(tmp_path):
    """`pipeline/train.py --config bad.yaml` exits 2 with one error line, no traceback, no Ray."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"data": {"root": str(tmp_path), "batch_size": 0}}))
    started = time.monotonic()
    done = subprocess.run([sys.executable, "pipeline/train.py", "--config", str(bad)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert lines == [f"error: invalid config from {bad}: data.batch_size must be >= 1, got 0"], done.stderr
    assert "Traceback" not in done.stdout + done.stderr and "Ray" not in done.stdout + done.stderr
    assert time.monotonic() - started < BOUND_S


# -- preprocessing flags ---------------------------------------------------------------------------------------

_KINETICS = ["kinetics", "--csv", "c.csv", "--videos", "v", "--out", "o"]
_IMAGENET = ["imagenet", "--root", "r", "--split", "train", "--out", "o"]
BAD_FLAGS = [
    (_KINETICS, "--shard-samples", "0", "must be >= 1"),
    (_KINETICS, "--shard-samples", "-4", "must be >= 1"),
    (_KINETICS, "--shard-samples", "ten", "not an integer"),
    (_KINETICS, "--shard-bytes", "-5GB", "not a size"),
    (_KINETICS, "--shard-bytes", "lots", "not a size"),
    (_KINETICS, "--workers", "0", "must be >= 1"),
    (_KINETICS, "--short-side", "0", "must be >= 1"),
    (_KINETICS, "--gop", "-1", "must be >= 1"),
    (_KINETICS, "--crf", "99", "must be in [0, 51]"),
    (_KINETICS, "--preset", "warp", "invalid choice"),
    (_IMAGENET, "--quality", "0", "must be in [1, 95]"),
    (_IMAGENET, "--max-side", "0", "must be >= 1"),
    (_IMAGENET, "--max-pixels", "-1", "must be >= 1"),
    (["synth", "kinetics", "--out", "o"], "--size", "96by72", "WIDTHxHEIGHT"),
    (["synth", "kinetics", "--out", "o"], "--classes", "0", "must be >= 1"),
    (["synth", "kinetics", "--out", "o"], "--val-per-class", "-1", "must be >= 0"),
    (["verify", "u", "--split", "train"], "--decode", "-2", "must be >= 0"),
]


@pytest.mark.parametrize(("command", "flag", "value", "says"), BAD_FLAGS,
                         ids=[f"{c[0]}{f}={v}" for c, f, v, _ in BAD_FLAGS])
def test_bad_preprocessing_flag_is_refused_while_parsing(capsys, command, flag, value, says):
    """A bad preprocessing flag is refused while parsing, naming the flag."""
    from preprocessing.cli import build_parser

    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args([*command, f"{flag}={value}"])
    assert caught.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {flag}" in last and says in last, last


def test_no_shard_size_at_all_is_refused_before_reading_inputs(tmp_path):
    """`--shard-bytes 0` without `--shard-samples` is refused before any input is read."""
    done = _preprocess("kinetics", "--csv", str(tmp_path / "missing.csv"), "--videos", str(tmp_path),
                       "--out", str(tmp_path / "out"), "--shard-bytes", "0")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["error: --shard-bytes 0 means no byte bound: give --shard-samples N as well"]
    assert not (tmp_path / "out").exists()


# -- missing / wrong S3 credentials, unreachable endpoints --------------------------------------------------------

def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    """The environment with no AWS credentials at all: no keys, no profile, no config files, no IMDS."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "RAY_ADDRESS"}
    env.update(AWS_CONFIG_FILE="/nonexistent/aws-config", AWS_SHARED_CREDENTIALS_FILE="/nonexistent/aws-credentials",
               AWS_EC2_METADATA_DISABLED="true", AWS_DEFAULT_REGION="us-east-1", PYTHONPATH=str(REPO))
    env.update(extra)
    return env


def _with_planted_keys() -> dict[str, str]:
    return _env(AWS_ACCESS_KEY_ID="AKIAPLANTEDKEYID0000", AWS_SECRET_ACCESS_KEY=PLANTED_SECRET)


def _preprocess(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "preprocessing", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=env or _env())


@pytest.fixture(scope="module")
def raw_kinetics(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from preprocessing.synth import SynthKinetics, synth_kinetics

    root = tmp_path_factory.mktemp("raw_kinetics")
    synth_kinetics(SynthKinetics(str(root), classes=2, per_class=2, val_per_class=0, seconds=1, fps=8, width=32,
                                 height=24))
    return root


def _assert_one_line_failure(done: subprocess.CompletedProcess, seconds: float, url: str) -> str:
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert seconds < BOUND_S, f"took {seconds:.1f}s"
    assert "Traceback" not in output, output
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and url in errors[0], done.stderr
    assert PLANTED_SECRET not in output
    return errors[0]


# What the one error line must say about each cause, besides the URL: botocore's own words for it and,
# without credentials, where they are looked for.
NO_CREDENTIALS = ("NoCredentialsError: Unable to locate credentials", "credentials come only from the environment")
REFUSED = ("EndpointConnectionError: Could not connect to the endpoint URL",)


@pytest.mark.parametrize("case", ["no credentials", "no such bucket", "endpoint refuses connections"])
def test_preprocessing_to_unusable_s3_fails_fast_with_one_line_naming_the_url(raw_kinetics, s3_server, case):
    """Preprocessing to unusable S3 exits non-zero in < 60 s with one line naming the URL and the cause."""
    url, endpoint, env = "s3://mvit-no-such-bucket/shards", s3_server, _with_planted_keys()
    if case == "no credentials":
        import s3fs

        s3fs.S3FileSystem(endpoint_url=s3_server, key="k", secret="s", skip_instance_cache=True).mkdir("mvit-nocreds")
        url, env = "s3://mvit-nocreds/shards", _env()
    elif case == "endpoint refuses connections":
        endpoint = f"http://127.0.0.1:{_closed_port()}"
    started = time.monotonic()
    done = _preprocess("kinetics", "--csv", str(raw_kinetics / "annotations" / "train.csv"), "--videos",
                       str(raw_kinetics), "--out", url, "--s3-endpoint-url", endpoint, "--shard-samples", "2",
                       "--workers", "1", "--no-progress", env=env)
    line = _assert_one_line_failure(done, time.monotonic() - started, url)
    says = {"no credentials": NO_CREDENTIALS, "no such bucket": (f"error: bucket of {url} does not exist",),
            "endpoint refuses connections": (*REFUSED, endpoint)}[case]
    assert all(part in line for part in says), line
    # Nothing was transcoded: the store is checked before the first input is read.
    assert "estimating output size" not in done.stderr


def test_verify_against_s3_without_credentials_is_one_line(s3_server):
    """`verify` of s3:// without credentials exits non-zero with one error line naming the URL and the missing credentials."""
    url = "s3://mvit-nocreds-verify/shards"
    started = time.monotonic()
    done = _preprocess("verify", url, "--split", "train", "--split", "val", "--s3-endpoint-url", s3_server)
    line = _assert_one_line_failure(done, time.monotonic() - started, url)
    assert all(part in line for part in NO_CREDENTIALS), line
    assert "FAIL" not in done.stdout, "an unusable store is no finding about the shards: " + done.stdout


def _manifests(root: Path, classes: int = 3) -> None:
    """A shard set's manifests only (no shards): all the driver reads before it starts Ray."""
    from core.manifest import Manifest

    for split in ("train", "val"):
        manifest = Manifest(dataset="kinetics", split=split, modality="video", classes=[f"c{i}" for i in range(classes)],
                            num_inputs=0, num_samples=0, num_rejected=0, total_bytes=0, shards=[], tool_version="test",
                            settings={})
        root.mkdir(parents=True, exist_ok=True)
        (root / f"{split}.manifest.json").write_text(manifest.to_json())


@pytest.fixture
def fresh_s3_clients():
    """s3fs caches clients (with the credentials they found) per endpoint: no test may see another's."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.parametrize("case", ["no credentials", "endpoint refuses connections", "no such bucket"])
def test_training_with_unusable_s3_data_root_fails_before_ray_starts(s3_server, monkeypatch, no_ray_start,
                                                                     fresh_s3_clients, case):
    """An unusable s3:// data.root fails the job before Ray starts, naming data.root."""
    from pipeline.trainer.job import run

    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    for name, value in _env().items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)
    endpoint = s3_server
    if case != "no credentials":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAPLANTEDKEYID0000")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", PLANTED_SECRET)
    if case == "endpoint refuses connections":
        endpoint = f"http://127.0.0.1:{_closed_port()}"
    cfg = load_config(DEMO, ["data.root=s3://mvit-missing-data/shards", f"data.s3_endpoint_url={endpoint}"])
    started = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        run(cfg)
    message = str(caught.value)
    assert time.monotonic() - started < BOUND_S
    assert "data.root='s3://mvit-missing-data/shards'" in message and "\n" not in message, message
    assert PLANTED_SECRET not in message
    says = {"no credentials": NO_CREDENTIALS[0], "endpoint refuses connections": REFUSED[0],
            "no such bucket": "The specified bucket does not exist"}[case]
    assert says in message, message


@pytest.mark.parametrize("case", ["endpoint refuses connections", "no such bucket"])
def test_training_with_unusable_s3_storage_path_fails_before_ray_starts(tmp_path, s3_server, monkeypatch, no_ray_start,
                                                                        case):
    """An unusable s3:// trainer.storage_path fails the job before Ray starts, naming it."""
    from pipeline.trainer.job import run

    _manifests(tmp_path / "shards")
    endpoint = s3_server if case == "no such bucket" else f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    cfg = load_config(DEMO, [f"data.root={tmp_path / 'shards'}", "trainer.storage_path=s3://mvit-missing-runs/runs",
                             f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db"])
    started = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        run(cfg)
    message = str(caught.value)
    assert time.monotonic() - started < BOUND_S
    assert "trainer.storage_path='s3://mvit-missing-runs/runs'" in message and "\n" not in message, message
    says = {"no such bucket": ("bucket 'mvit-missing-runs' does not exist",),
            "endpoint refuses connections": ("storage not reachable", "Could not connect")}[case]
    assert all(part in message for part in says), message


def test_training_with_an_uncreatable_local_storage_path_fails_before_ray_starts(tmp_path, no_ray_start):
    """An uncreatable local trainer.storage_path fails the job before Ray starts."""
    from pipeline.trainer.job import run

    _manifests(tmp_path / "shards")
    (tmp_path / "file").write_text("not a folder")
    cfg = load_config(DEMO, [f"data.root={tmp_path / 'shards'}", f"trainer.storage_path={tmp_path / 'file' / 'runs'}",
                             f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db"])
    with pytest.raises(ConfigError, match=r"trainer\.storage_path=.*cannot create the folder"):
        run(cfg)


def test_train_script_with_unreachable_data_root_exits_with_one_line(tmp_path):
    """`pipeline/train.py` with data.root on a dead endpoint exits 2 in < 60 s, one line."""
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    started = time.monotonic()
    done = subprocess.run([sys.executable, "pipeline/train.py", "--config", str(DEMO), "data.root=s3://mvit-x/shards",
                           f"data.s3_endpoint_url={endpoint}"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=_with_planted_keys())
    elapsed = time.monotonic() - started
    assert done.returncode == 2, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "data.root='s3://mvit-x/shards'" in errors[0] and REFUSED[0] in errors[0], done.stderr
    assert "Traceback" not in done.stderr and "Started a local Ray" not in done.stdout + done.stderr
    assert PLANTED_SECRET not in done.stdout + done.stderr
    assert elapsed < BOUND_S, f"took {elapsed:.1f}s"
