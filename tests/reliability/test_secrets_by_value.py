"""Secrets redacted by value and by shape (``core/redact.py``), and kept out of every job upload.

A credential set in the environment and pulled into a config with ``${oc.env:...}`` (a GitHub PAT, an
Azure storage connection string, an AWS key pair) must never reach ``--print-config``, MLflow, a config
error's line, a log record or a CLI's error line; a credential met in any text is replaced by its shape
even when it is in no environment; a job's working_dir upload never carries .env, key or token files,
local data or runs. Ordinary values (git SHAs, paths, bucket URLs, model names, numbers) are kept.

The planted secrets are fresh random values in the shape real ones have; every case hands each output it
checked to ``ledger.account_text``, which counts any planted value found in the summary's "secrets leaked".
"""

from __future__ import annotations

import base64
import http.server
import importlib
import io
import json
import logging
import os
import random
import string
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from core.redact import (
    REDACTED,
    WORKER_SETUP_HOOK,
    install_redaction,
    redact_mapping,
    redact_text,
    secret_env_values,
)

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "experiment" / "demo.yaml"
_RNG = random.SystemRandom()
_ALNUM = string.ascii_letters + string.digits
_UPPER = string.ascii_uppercase + string.digits


def _draw(n: int, alphabet: str = _ALNUM) -> str:
    return "".join(_RNG.choice(alphabet) for _ in range(n))


def _b64url(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def _jwt() -> str:
    return f"{_b64url({'alg': 'HS256', 'typ': 'JWT'})}.{_b64url({'sub': _draw(12), 'exp': 1924992000})}.{_draw(43)}"


AZURE_ACCOUNT_KEY = _draw(86, _ALNUM + "+/") + "=="
PLANTED_ENV = {
    "GITHUB_PAT": f"ghp_{_draw(36)}",
    "AZURE_STORAGE_CONNECTION_STRING": f"DefaultEndpointsProtocol=https;AccountName=mvit{_draw(8, string.digits)};"
                                       f"AccountKey={AZURE_ACCOUNT_KEY};EndpointSuffix=core.windows.net",
    "AWS_ACCESS_KEY_ID": f"AKIA{_draw(16, _UPPER)}",
    "AWS_SECRET_ACCESS_KEY": _draw(40, _ALNUM + "/+"),
    "MVIT_DB_CONN_STR": f"Server=db;User Id=mvit;Password={_draw(20)}",  # secret by its name
    "MVIT_DEPLOY_NOTE": _jwt(),  # a name that says nothing: secret by its value's shape
}
# What must not appear: each value whole, and the part of the connection string that is the credential.
SECRETS = {**PLANTED_ENV, "AccountKey of AZURE_STORAGE_CONNECTION_STRING": AZURE_ACCOUNT_KEY}
GIT_SHA = "".join(_RNG.choice("0123456789abcdef") for _ in range(40))
# Config overrides that pull every planted secret in through ${oc.env:...}, beside ordinary values.
OVERRIDES = [
    "tracking.tags.github=${oc.env:GITHUB_PAT}",
    "tracking.tags.storage=${oc.env:AZURE_STORAGE_CONNECTION_STRING}",
    "tracking.tags.rotated=${oc.env:AWS_ACCESS_KEY_ID}:${oc.env:AWS_SECRET_ACCESS_KEY}",
    "tracking.tags.database=${oc.env:MVIT_DB_CONN_STR}",
    "tracking.tags.deploy=${oc.env:MVIT_DEPLOY_NOTE}",
    "tracking.run_name=run-${oc.env:GITHUB_PAT}",
    f"tracking.tags.source_commit={GIT_SHA}",
    "tracking.tags.bucket=s3://mvit-data/kinetics/shards",
]
REDACTED_TAGS = {"github": REDACTED, "storage": REDACTED, "rotated": f"{REDACTED}:{REDACTED}",
                 "database": REDACTED, "deploy": REDACTED}
KEPT_TAGS = {"source_commit": GIT_SHA, "bucket": "s3://mvit-data/kinetics/shards"}


def _planted_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, **PLANTED_ENV, "PYTHONPATH": str(REPO)}


@pytest.fixture
def planted(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in PLANTED_ENV.items():
        monkeypatch.setenv(name, value)


def _train(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "pipeline/train.py", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


# -- where a secret from the environment could surface -----------------------------------------------------------

def test_print_config_shows_no_secret_taken_from_the_environment(ledger):
    """`train.py --print-config` shows `***` for every secret a config took from the environment; other values kept."""
    done = _train("--config", str(DEMO), *OVERRIDES, "--print-config", env=_planted_env())
    assert done.returncode == 0, done.stderr[-3000:]
    ledger.account_text({"stdout of --print-config": done.stdout, "stderr of --print-config": done.stderr}, SECRETS)
    printed = yaml.safe_load(done.stdout)
    assert printed["tracking"]["tags"] == {**REDACTED_TAGS, **KEPT_TAGS}
    assert printed["tracking"]["run_name"] == f"run-{REDACTED}"
    assert printed["data"]["root"] == "data/demo/shards" and printed["model"]["preset"] == "mvit_b_16x4"


def test_mlflow_params_tags_and_run_name_hold_no_secret_from_the_environment(planted, tmp_path, monkeypatch, ledger):
    """MLflow params, tags and run name show `***` for each secret a config took from the environment; git SHAs kept."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.config import load_config, to_container
    from pipeline.tracking import Tracker

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the file store starts in a second, SQLite in ten
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # set_tracking_uri sets it: restored after
    uri = (tmp_path / "mlruns").as_uri()
    cfg = load_config(DEMO, [*OVERRIDES, "tracking.log_system_metrics=false"])
    tracker = Tracker(cfg.tracking, uri, enabled=True)
    aws_pair = f"{PLANTED_ENV['AWS_ACCESS_KEY_ID']} {PLANTED_ENV['AWS_SECRET_ACCESS_KEY']}"
    tags = {"git_commit": GIT_SHA, "note": f"keys {aws_pair}"}
    try:
        run_id = tracker.start(cfg.tracking.run_name, None, to_container(cfg), tags, job_key="secrets-by-value")
    finally:
        tracker.finish()
        mlflow.set_tracking_uri(None)  # back to the environment's (the tracker set this process's URI)
    run = MlflowClient(uri).get_run(run_id)
    params, stored = run.data.params, run.data.tags
    ledger.account_text({"MLflow params": json.dumps(params), "MLflow tags": json.dumps(stored)}, SECRETS)
    assert {k: params[f"tracking.tags.{k}"] for k in REDACTED_TAGS} == REDACTED_TAGS
    assert {k: stored[k] for k in [*REDACTED_TAGS, *KEPT_TAGS]} == {**REDACTED_TAGS, **KEPT_TAGS}
    assert stored["git_commit"] == GIT_SHA and stored["note"] == f"keys {REDACTED} {REDACTED}"
    assert stored["mlflow.runName"] == f"run-{REDACTED}"


@pytest.mark.parametrize("override", [
    "trainer.epochs=${oc.env:GITHUB_PAT}",  # OmegaConf's own message quotes the value
    "data.s3_endpoint_url=${oc.env:AZURE_STORAGE_CONNECTION_STRING}",
    "name=${oc.env:AWS_ACCESS_KEY_ID}/${oc.env:AWS_SECRET_ACCESS_KEY}",
    "data.train_split=${oc.env:MVIT_DB_CONN_STR}",
    "optim.lr=${oc.env:MVIT_DEPLOY_NOTE}",
], ids=lambda override: override.partition("=")[0])  # fmt: skip
def test_config_error_line_shows_no_secret_taken_from_the_environment(override, ledger):
    """A config error about a value taken from the environment names the key on one line, the secret shown as `***`."""
    # no shards there: were the override ever accepted, the driver would still stop before starting Ray
    done = _train("--config", str(DEMO), "data.root=/nonexistent/mvit-shards", override, env=_planted_env())
    assert done.returncode == 2, done.stdout + done.stderr
    ledger.account_text({"stdout of train.py": done.stdout, "stderr of train.py": done.stderr}, SECRETS)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    key = override.partition("=")[0]
    assert len(errors) == 1 and key in errors[0] and REDACTED in errors[0], done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("cli", ["train", "preprocess"])
def test_a_cli_error_line_shows_no_credential_shape_even_one_in_no_environment(cli, tmp_path, ledger):
    """A CLI's one-line error quoting a credential-shaped text that no environment variable holds shows it as `***`."""
    shaped = {"GitHub token": f"ghp_{_draw(36)}", "Slack token": f"xoxb-{_draw(12, string.digits)}-{_draw(24)}",
              "AWS access key id": f"AKIA{_draw(16, _UPPER)}"}
    missing = tmp_path.joinpath("exports", *shaped.values())  # a path the error quotes
    if cli == "train":
        args = ["pipeline/train.py", "--config", f"{missing}.yaml"]
    else:
        args = ["-m", "preprocessing", "kinetics", "--csv", f"{missing}.csv", "--videos", str(tmp_path), "--out",
                str(tmp_path / "out")]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, *args], cwd=REPO, env={**env, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    ledger.account_text({f"stdout of {cli}": done.stdout, f"stderr of {cli}": done.stderr}, shaped)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"{tmp_path / 'exports'}/***" in errors[0], done.stderr


@pytest.fixture
def redaction_installed(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """``install_redaction()`` for the test; the log record factory and ``sys.excepthook`` restored after."""
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    factory = logging.getLogRecordFactory()
    install_redaction()
    yield
    logging.setLogRecordFactory(factory)


def test_log_records_and_uncaught_tracebacks_carry_no_secret(planted, redaction_installed, capsys, ledger):
    """Log records (message, arguments, traceback) and an uncaught exception's traceback carry no secret."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)  # a handler added after the redaction was installed
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    log = logging.getLogger("pipeline.test_secrets_by_value")
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.INFO)
    pat, conn = PLANTED_ENV["GITHUB_PAT"], PLANTED_ENV["AZURE_STORAGE_CONNECTION_STRING"]
    try:
        log.info("config tags %s", {"github": pat, "storage": conn})
        log.warning(f"cannot reach the store with {conn}")
        log.warning("retrying with %s:%s", PLANTED_ENV["AWS_ACCESS_KEY_ID"], PLANTED_ENV["AWS_SECRET_ACCESS_KEY"])
        try:
            raise RuntimeError(f"upload refused for token {pat} and {PLANTED_ENV['MVIT_DEPLOY_NOTE']}")
        except RuntimeError as err:
            log.exception("upload failed")
            sys.excepthook(type(err), err, err.__traceback__)
        # a credential in no environment variable: replaced by its shape
        unplanted = {"GitHub token": f"gho_{_draw(36)}", "bearer token": f"{_draw(30)}9"}
        log.error("call with Authorization: Bearer %s and %s", unplanted["bearer token"], unplanted["GitHub token"])
    finally:
        log.removeHandler(handler)
        log.propagate = True
    written, stderr = stream.getvalue(), capsys.readouterr().err
    ledger.account_text({"log records": written, "uncaught exception's traceback": stderr}, {**SECRETS, **unplanted})
    assert written.count(REDACTED) >= 8 and "Traceback" in written and "upload failed" in written, written
    assert "RuntimeError: upload refused for token ***" in stderr, stderr


def test_every_ray_worker_of_a_job_installs_the_redaction(tmp_path, monkeypatch):
    """The driver starts Ray with the redaction as every worker's setup hook, before any worker runs."""
    import ray

    from core import faults
    from pipeline.config import load_config
    from pipeline.trainer import job

    hook_module, _, hook_name = WORKER_SETUP_HOOK.rpartition(".")
    assert getattr(importlib.import_module(hook_module), hook_name) is install_redaction

    class Started(Exception):
        pass

    def init(**kwargs):  # noqa: ANN003, ANN202
        raise Started(kwargs)

    cfg = load_config(DEMO, [f"trainer.storage_path={tmp_path / 'runs'}",
                             f"tracking.tracking_uri=sqlite:///{tmp_path}/m.db"])
    info = job.DatasetInfo(["a", "b"], {"train": "{}", "val": "{}"}, {"train": "0", "val": "1"}, {"train": 4, "val": 2},
                           {"train": 1, "val": 1})  # fmt: skip
    monkeypatch.setattr(job, "describe_data", lambda _cfg: info)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.delenv(faults.ENV, raising=False)
    for address in ("http://127.0.0.1:8265", None):  # a submitted job (RAY_ADDRESS set), then a local Ray
        if address:
            monkeypatch.setenv("RAY_ADDRESS", address)
        else:
            monkeypatch.delenv("RAY_ADDRESS", raising=False)
            monkeypatch.setattr("core.loopback.keep_ray_on_loopback", lambda: None)
        with pytest.raises(Started) as started:
            job.run(cfg)
        assert started.value.args[0]["runtime_env"]["worker_process_setup_hook"] == WORKER_SETUP_HOOK


# -- credential shapes, in the environment or not -----------------------------------------------------------------

def _pem() -> tuple[str, str]:
    body = "\n".join(_draw(64, _ALNUM + "+/") for _ in range(4))
    return f"-----BEGIN RSA PRIVATE KEY-----\n{body}\n-----END RSA PRIVATE KEY-----", body


def _shapes() -> list[tuple[str, str, list[str]]]:
    """(variant, text, the secret parts of it) for every credential shape redacted without the environment."""
    key_id, secret = f"ASIA{_draw(16, _UPPER)}", _draw(40, _ALNUM + "/+")
    account_key, sig, pem_text = _draw(86, _ALNUM + "+/") + "==", _draw(43) + "%3D", _pem()
    cases = [
        ("aws-access-key-id", f"using access key {key_id} for s3", [key_id]),
        ("aws-key-pair-csv", f"Access key ID,Secret access key\n{key_id},{secret}\n", [key_id, secret]),
        ("aws-key-pair-beside", f"keys: {key_id} {secret}", [key_id, secret]),
        ("aws-secret-assignment", f"[default]\naws_secret_access_key = {secret}\n", [secret]),
        ("aws-secret-json", f'{{"AccessKeyId": "{key_id}", "SecretAccessKey": "{secret}"}}', [key_id, secret]),
        *[(f"github-{p.rstrip('_')}", f"git clone https://x-access-token:{t}@github.com/o/r or token {t}", [t])
          for p in ("ghp_", "gho_", "ghu_", "ghs_", "ghr_") for t in [f"{p}{_draw(36)}"]],
        *[("github-fine-grained-pat", f"GH_NOTE={t}", [t]) for t in [f"github_pat_{_draw(22)}_{_draw(59)}"]],
        *[(f"slack-{p[:4]}", f"posting with {t}", [t]) for p in ("xoxb", "xoxp", "xoxa", "xoxr")
          for t in [f"{p}-{_draw(12, string.digits)}-{_draw(13, string.digits)}-{_draw(24)}"]],
        *[("bearer-token", f"curl -H 'Authorization: Bearer {t}' https://api", [t]) for t in [_draw(40) + "7"]],
        *[("bearer-in-text", f"retrying with Bearer {t} after 401", [t]) for t in [_draw(30) + "7"]],
        *[("authorization-header", f"headers={{'Authorization': 'Basic {t}'}}", [t])
          for t in [base64.b64encode(f"mvit:{_draw(16)}".encode()).decode()]],
        ("azure-connection-string", f"DefaultEndpointsProtocol=https;AccountName=mvitstore;AccountKey={account_key};"
                                    "EndpointSuffix=core.windows.net", [account_key]),
        ("azure-shared-access-signature", f"BlobEndpoint=https://mvit.blob.core.windows.net/;SharedAccessSignature="
                                          f"sv=2022-11-02&ss=b&srt=co&sp=rl&se=2030-01-01&sig={sig}", [sig]),
        ("azure-sas-url", f"reading https://mvit.blob.core.windows.net/shards/x.tar?sv=2022-11-02&sr=b&sig={sig}",
         [sig]),
        *[("password-in-url", f"tracking at postgresql://mlflow:{p}@db:5432/mlflow", [p]) for p in [_draw(18)]],
        *[("password-assignment", f"tracking.tags.db_password={p} name=demo", [p]) for p in [_draw(18)]],
        *[("quoted-token", f"{{'api_token': '{t}', 'retries': 3}}", [t]) for t in [_draw(24)]],
        ("private-key-pem", f"key file:\n{pem_text[0]}\nend", [pem_text[1]]),
        *[("jwt", f"id_token {t} expired", [t]) for t in [_jwt()]],
    ]
    return cases


SHAPES = _shapes()


@pytest.mark.parametrize("variant, text, parts", SHAPES, ids=[c[0] for c in SHAPES])
def test_a_credential_shape_is_replaced_wherever_it_appears(variant, text, parts, ledger):
    """A credential recognisable by its shape is replaced by `***` in any text, set in the environment or not."""
    out = redact_text(text, secrets=())
    ledger.account_text({f"redacted {variant}": out}, {f"{variant} part {i}": p for i, p in enumerate(parts)})
    assert REDACTED in out


ENV_SECRETS = [
    ("GITHUB_PAT", _draw(24)),  # no shape: secret by its name
    ("MVIT_PRIVATE_SIGNING", _draw(24)),
    ("SERVICE_AUTH", _draw(24)),
    ("OPENAI_API_KEY", f"sk-{_draw(40)}"),
    ("STORE", f"DefaultEndpointsProtocol=https;AccountName=mvit;AccountKey={_draw(40)}=="),  # by shape: replaced whole
    ("CI_NOTE", f"ghs_{_draw(36)}"),
]


@pytest.mark.parametrize("name, value", ENV_SECRETS, ids=[name for name, _ in ENV_SECRETS])  # never the value
def test_an_environment_secret_is_replaced_wherever_its_value_appears(name, value, monkeypatch, ledger):
    """The value of an environment variable named like a secret, or shaped like one, is replaced in any text."""
    monkeypatch.setenv(name, value)
    out = redact_text(f"value={value}; quoted {value!r}; in a path /tmp/{value}/x; in JSON {json.dumps([value])}")
    ledger.account_text({f"text with {name}": out}, {name: value})
    assert out.count(REDACTED) == 4, out


KEPT = [
    ("git-sha", GIT_SHA),
    ("git-commit-assignment", f"git_commit={GIT_SHA}"),
    ("sha256-digest", "".join(_RNG.choice("0123456789abcdef") for _ in range(64))),
    ("lone-40-char-base64", "wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY00"),  # a 40-char string with no key id beside it
    ("s3-url", "s3://mvit-data/kinetics/shards/train-000000.tar"),
    ("sqlite-uri", "sqlite:////home/mvit/runs/mlflow.db"),
    ("http-endpoint", "http://127.0.0.1:9000/bucket?versionId=3"),
    ("url-with-user-only", "https://mvit@github.com/org/repo.git"),
    ("model-names", "mvit_b_16x4 mvit_v2_s mvit_b_32x3"),
    ("numbers", "lr=0.0016 min_lr=1e-05 epochs=30 betas=[0.9, 0.999] 3.14"),
    ("short-values", "id=abc key=x7 mode=token"),
    ("keys-that-are-not-credentials", "num_tokens=5 token_file=/run/secrets/mlflow compat=1 sigma=0.5 "
                                      "mvit.job_key=0f3a9c1b2d4e5f60 password_min_length=12"),
    ("prose", "the token Secret must be created out of band; Bearer tokens are sent by the client; "
              "authorization failed for user mvit; see the Slack channel"),
    ("tar-member-names", "train-000000.tar: kinetics_abc_000010_000020.mp4, .cls, .json"),
]  # fmt: skip


@pytest.mark.parametrize("variant, text", KEPT, ids=[k for k, _ in KEPT])
def test_an_ordinary_value_is_kept(variant, text):
    """A git SHA, a digest, a path, a bucket URL, a model name, a number or a short value is kept as it is."""
    assert redact_text(text) == text


def test_the_project_configs_and_ordinary_environment_variables_are_kept(monkeypatch):
    """Every experiment config passes the redaction unchanged; variables naming a place or a setting are no secrets."""
    from pipeline.config import load_config, to_container

    ordinary = {"MVIT_TOKEN_FILE": "/run/secrets/mvit-token", "SSH_AUTH_SOCK": "/tmp/ssh-XXXXabcd/agent.4242",
                "RAY_AUTH_MODE": "token", "GIT_ASKPASS": sys.executable, "MVIT_API_TIMEOUT": "300",
                "MVIT_AUTH_ENABLED": "true", "KEYTAB_PATH": "/etc/krb5.keytab"}
    for name, value in ordinary.items():
        monkeypatch.setenv(name, value)
    kept = sorted(name for name, value in ordinary.items() if value in secret_env_values())
    assert not kept, f"treated as secrets: {kept}"
    configs = sorted((REPO / "configs" / "experiment").glob("*.yaml"))
    assert configs
    for path in configs:
        values = to_container(load_config(path, ["data.root=s3://mvit-data/shards"]))
        assert json.dumps(redact_mapping(values)) == json.dumps(values), path.name  # (tuples come back as lists)


# -- what a job's working_dir upload carries --------------------------------------------------------------------

# Files that must never be uploaded, each holding a planted value (the zip is searched for the values too).
PLANTED_FILES = [
    ".env", ".env.production", "configs/.env", "secrets.pem", "deploy/tls.key", "deploy/client.p12",
    "deploy/client.pfx", "deploy/id_rsa", "deploy/id_ed25519.pub", "credentials", ".aws/credentials", ".aws/config",
    ".ssh/known_hosts", ".git-credentials", ".netrc", ".ray_token", "scripts/gh_token.txt", "data/demo/shards/x.tar",
    "runs/demo/mlflow.db", "runs/demo/checkpoint_000001/train_state.json", "mlruns/0/meta.yaml",
    "mlartifacts/1/final_model.safetensors", "local.db",
]  # fmt: skip


class _Dashboard(http.server.BaseHTTPRequestHandler):
    """Just enough of Ray's job API for ``ray job submit --no-wait``: it keeps the package it is sent."""

    packages: list[bytes]

    def _reply(self, code: int, body: dict | None = None) -> None:
        data = json.dumps(body or {}).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802
        import ray

        if self.path == "/api/version":
            self._reply(200, {"version": "4", "ray_version": ray.__version__, "ray_commit": "test"})
        else:  # no package exists yet: the client uploads it
            self._reply(404)

    def do_PUT(self) -> None:  # noqa: N802
        self.packages.append(self.rfile.read(int(self.headers["Content-Length"])))
        self._reply(200)

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._reply(200, {"job_id": "raysubmit_test", "submission_id": "raysubmit_test"})

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def dashboard() -> Iterator[tuple[str, list[bytes]]]:
    """A stand-in job API on 127.0.0.1: (its address, the packages uploaded to it)."""
    packages: list[bytes] = []
    handler = type("Dashboard", (_Dashboard,), {"packages": packages})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", packages
    finally:
        server.shutdown()
        server.server_close()


def _tracked_files() -> list[str]:
    done = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [name for name in done.stdout.splitlines() if name not in (".gitignore", ".rayignore")]


@pytest.mark.parametrize("how", ["rayignore", "project-submit"])
def test_a_job_upload_carries_the_code_but_no_env_key_token_data_or_run_files(how, tmp_path, dashboard, ledger):
    """`ray job submit --working-dir` uploads every tracked file and no .env, key, token, data, run or database file."""
    from pipeline.local_cluster import UPLOAD_EXCLUDES, ray_executable, working_dir_args

    rayignore = REPO / ".rayignore"
    patterns = [line for line in rayignore.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert patterns == list(UPLOAD_EXCLUDES), "the .rayignore and UPLOAD_EXCLUDES must list the same patterns"
    tree, tracked = tmp_path / "checkout", _tracked_files()
    planted = {}
    for name in tracked + PLANTED_FILES:
        path = tree / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(planted.setdefault(name, f"planted-{_draw(24)}") if name in PLANTED_FILES else "")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    address, packages = dashboard
    if how == "rayignore":  # a plain `ray job submit --working-dir .` with the repository's .rayignore alone
        (tree / ".rayignore").write_bytes(rayignore.read_bytes())
        (tree / ".gitignore").write_bytes((REPO / ".gitignore").read_bytes())
        env["RAY_RUNTIME_ENV_IGNORE_GITIGNORE"] = "1"  # Ray skips .gitignore: only .rayignore protects
        args, expected = ["--working-dir", str(tree)], {*tracked, ".rayignore", ".gitignore"}
    else:  # what pipeline/local_cluster.py and pipeline/netns_cluster.py submit, in a folder with no ignore file
        args, expected = working_dir_args(tree), set(tracked)
    done = subprocess.run([ray_executable(), "job", "submit", "--address", address, "--no-wait", *args, "--", "true"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and len(packages) == 1, done.stdout[-2000:] + done.stderr[-2000:]
    with zipfile.ZipFile(io.BytesIO(packages[0])) as package:
        uploaded = {name for name in package.namelist() if not name.endswith("/")}
        contents = {name: package.read(name) for name in uploaded}
    ledger.account_text({f"uploaded {name}": data for name, data in contents.items()}, planted)
    assert not uploaded & set(PLANTED_FILES), sorted(uploaded & set(PLANTED_FILES))
    assert uploaded == expected, {"missing": sorted(expected - uploaded), "unexpected": sorted(uploaded - expected)}
