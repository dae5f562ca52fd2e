"""Credentials in a deployment that assumes a hostile neighbour (issue 13, point 7), checked on the
rendered overlays: each stage's pods hold that stage's S3 keys only, no manifest carries a credential,
MLflow serves only through its basic-auth app and its clients sign in with credentials from Secrets,
PostgreSQL gives MLflow a role that owns its databases and nothing more, and the example IAM policies
(k8s/iam/, also MinIO's in dev) give each stage its own prefixes.

The shell scripts the manifests carry (PostgreSQL's init script, dev's MinIO setup) run here with the
client they drive (psql, mc) replaced by a stub that records what it is asked to do."""

from __future__ import annotations

import configparser
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import types
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from k8s_manifests import (
    K8S,
    MLFLOW_CLIENT_ENV,
    S3_SECRETS,
    S3_STAGE_OF_CLUSTER,
    SECRET_LIKE_NAME,
    assert_check_catches,
    containers,
    env_of,
    named,
    of_kind,
    pod_templates,
    render,
    secret_refs,
)
from k8s_network import admits, network_policies, rendered_pods

IAM = K8S / "iam"
MLFLOW_SOURCE = Path(importlib.util.find_spec("mlflow").origin).parent  # read, not imported: the
# basic-auth package needs Flask-WTF (the image's mlflow[auth]), which this environment need not have
ROLE_ATTRIBUTES = ("SUPERUSER", "CREATEDB", "CREATEROLE", "REPLICATION", "BYPASSRLS")
DB_PASSWORD = "sentinel-db-password-0123"  # what the stubs must never see on a command line


def _problems_of(*problems: str | None) -> list[str]:
    return [p for p in problems if p]


def _secret_ref(container: dict[str, Any], name: str) -> dict[str, str] | None:
    return env_of(container).get(name, {}).get("valueFrom", {}).get("secretKeyRef")


# -- per-stage S3 keys -------------------------------------------------------------------------------------


def _s3_secrets_wanted(where: str) -> set[str]:
    """The S3 (and MinIO) Secrets a pod may read: a Ray node its cluster's stage's, MLflow the MLflow
    stage's; in dev MinIO its root user and the setup Job the root user and every stage's (it makes
    the stages' MinIO users); every other pod none."""
    kind_name, _, role = where.partition(" ")
    name = kind_name.split("/", 1)[1]
    if name in S3_STAGE_OF_CLUSTER and role != "submitter":
        return {S3_SECRETS[S3_STAGE_OF_CLUSTER[name]]}
    return {
        "Deployment/mlflow": {S3_SECRETS["mlflow"]},
        "Deployment/minio": {"mvit-minio-root"},
        "Job/minio-create-bucket": {"mvit-minio-root", *S3_SECRETS.values()},
    }.get(where, set())


def s3_secret_problems(docs: list[dict[str, Any]]) -> list[str]:
    problems = []
    for doc in docs:
        for where, template in pod_templates(doc):
            held = {s for s in secret_refs(template) if s.startswith("mvit-s3") or s == "mvit-minio-root"}
            wanted = _s3_secrets_wanted(where)
            if held != wanted:
                problems.append(f"{where} reads {sorted(held)}, should read {sorted(wanted)}")
            for container in containers(template):
                for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                    ref = _secret_ref(container, var)
                    if ref and ref["name"] not in wanted:
                        problems.append(f"{where} {container['name']}: {var} from {ref['name']}")
    return problems


# -- literal credentials ---------------------------------------------------------------------------------

_URI_WITH_PASSWORD = re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s:@$]+:[^/\s@$]+@")
_INI_SECRET = re.compile(r"^\s*\w*(password|secret|token)\w*\s*[=:]\s*\S", re.IGNORECASE | re.MULTILINE)
_AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")


def _strings(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return [node] if isinstance(node, str) else []


def literal_credential_problems(docs: list[dict[str, Any]]) -> list[str]:
    problems = [f"Secret/{d['metadata']['name']} rendered from the repository" for d in of_kind(docs, "Secret")]
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        for text in _strings(doc):
            if _URI_WITH_PASSWORD.search(text):
                problems.append(f"{name}: a URI with a password")
            if _AWS_KEY_ID.search(text):
                problems.append(f"{name}: an AWS access key id")
        if doc["kind"] == "ConfigMap":
            for key, value in doc.get("data", {}).items():
                if SECRET_LIKE_NAME.search(key) or (key.endswith((".ini", ".conf", ".cfg")) and _INI_SECRET.search(value)):
                    problems.append(f"{name}: {key} holds a credential")
        for where, template in pod_templates(doc):
            for container in containers(template):
                for entry in container.get("env", []):
                    if SECRET_LIKE_NAME.search(entry["name"]) and "secretKeyRef" not in entry.get("valueFrom", {}):
                        problems.append(f"{where} {container['name']}: {entry['name']} not from a Secret")
    return problems


# -- MLflow's authentication ------------------------------------------------------------------------------


def _mlflow_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return named(docs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]


def _mounted_file(docs: list[dict[str, Any]], template: dict[str, Any], container: dict[str, Any], path: str) -> str | None:
    """The text of the ConfigMap key a container sees at `path`, None if no ConfigMap is mounted there."""
    folder, _, key = path.rpartition("/")
    volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        volume = volumes.get(mount["name"], {})
        if mount["mountPath"].rstrip("/") == folder and "configMap" in volume:
            return named(docs, "ConfigMap", volume["configMap"]["name"]).get("data", {}).get(key)
    return None


def _auth_ini(docs: list[dict[str, Any]]) -> configparser.ConfigParser | None:
    template = named(docs, "Deployment", "mlflow")["spec"]["template"]
    container = template["spec"]["containers"][0]
    path = env_of(container).get("MLFLOW_AUTH_CONFIG_PATH", {}).get("value")
    text = _mounted_file(docs, template, container, path) if path else None
    if text is None:
        return None
    config = configparser.ConfigParser()
    config.read_string(text)
    return config


def _auth_config_keys() -> tuple[set[str], set[str]]:
    """(required, known) keys of the [mlflow] section, as the installed MLflow's auth config reads them."""
    text = (MLFLOW_SOURCE / "server/auth/config.py").read_text()
    required = set(re.findall(r'config\["mlflow"\]\["(\w+)"\]', text))
    optional = set(re.findall(r'config\["mlflow"\]\.get\(\s*"(\w+)"', text))
    optional |= set(re.findall(r'config\.get\w*\(\s*"mlflow",\s*"(\w+)"', text))
    return required, required | optional


def _permissions() -> set[str]:
    text = (MLFLOW_SOURCE / "server/auth/permissions.py").read_text()
    return set(re.findall(r'^\w+ = Permission\(\s*name="(\w+)"', text, re.MULTILINE))


def _auth_ini_problems(config: configparser.ConfigParser | None) -> list[str]:
    if config is None or "mlflow" not in config:
        return ["MLFLOW_AUTH_CONFIG_PATH names no [mlflow] section of a mounted ConfigMap"]
    section = dict(config["mlflow"])
    required, known = _auth_config_keys()
    problems = _problems_of(
        f"basic_auth.ini lacks {sorted(required - set(section))}" if required - set(section) else None,
        f"basic_auth.ini: keys MLflow does not read: {sorted(set(section) - known)}" if set(section) - known else None,
        None if section.get("default_permission") in _permissions() else "basic_auth.ini: default_permission is no permission",
        "basic_auth.ini: the admin password belongs in a Secret" if "admin_password" in section else None,
    )
    store = urlsplit(section.get("database_uri", ""))
    if not store.scheme.startswith("postgresql") or store.password is not None or store.hostname != "postgres":
        problems.append(f"the auth store must be PostgreSQL, signed in by PGPASSWORD: {section.get('database_uri')}")
    return problems


def _client_problems(docs: list[dict[str, Any]]) -> list[str]:
    """Every pod MLflow admits signs in with a user and password from Secrets; the Ray nodes as the
    non-admin client user."""
    problems = []
    mlflow = next(p for p in rendered_pods(docs) if p.where == "Deployment/mlflow")
    admitted = [p for p in rendered_pods(docs) if p is not mlflow and admits(network_policies(docs), p, mlflow, 5000)]
    if not admitted:
        problems.append("no pod may reach MLflow")
    for pod in admitted:
        for container in containers(pod.template):
            refs = {var: _secret_ref(container, var) for var in MLFLOW_CLIENT_ENV}
            missing = sorted(var for var, ref in refs.items() if not ref)
            if missing:
                problems.append(f"{pod.where} {container['name']}: {missing} not from Secrets")
            elif pod.where != "Job/mlflow-create-user" and any(
                (ref["name"], ref["key"]) != MLFLOW_CLIENT_ENV[var] for var, ref in refs.items()
            ):
                problems.append(f"{pod.where} {container['name']}: not signed in as the client user {refs}")
    return problems


def mlflow_auth_problems(docs: list[dict[str, Any]]) -> list[str]:
    container = _mlflow_container(docs)
    env = env_of(container)
    problems = [] if "--app-name=basic-auth" in container["args"] else ["mlflow server runs without --app-name=basic-auth"]
    for var in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "PGPASSWORD"):
        if not _secret_ref(container, var):
            problems.append(f"MLflow's {var} is not from a Secret")
    if "value" in env.get("MLFLOW_AUTH_ADMIN_PASSWORD", {}):
        problems.append("MLflow's admin password is written in the manifest")
    return problems + _auth_ini_problems(_auth_ini(docs)) + _client_problems(docs)


# -- PostgreSQL's role for MLflow ---------------------------------------------------------------------------


def _run_with_stub(script: str, client: str, env: dict[str, str], workdir: Path) -> tuple[list[list[str]], str]:
    """Runs a manifest's bash script with `client` (psql, mc) replaced by a stub; returns each call's
    arguments and everything the stub read on stdin."""
    bin_dir = workdir / "bin"
    bin_dir.mkdir(exist_ok=True)
    stub = bin_dir / client
    stub.write_text(f'#!/bin/bash\nprintf "%q " "$@" >>"{workdir}/calls"; echo >>"{workdir}/calls"\n'
                    f'[ -t 0 ] || cat >>"{workdir}/stdin"\n')  # fmt: skip
    stub.chmod(0o755)
    run_env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "TMPDIR": str(workdir), "HOME": str(workdir), **env}
    result = subprocess.run(["bash", "-c", script], env=run_env, capture_output=True, text=True, timeout=30,
                            stdin=subprocess.DEVNULL)  # fmt: skip
    assert result.returncode == 0, result.stderr
    calls = [shlex.split(line) for line in (workdir / "calls").read_text().splitlines()]
    stdin = (workdir / "stdin").read_text() if (workdir / "stdin").exists() else ""
    return calls, stdin


def _init_script(docs: list[dict[str, Any]]) -> tuple[str | None, list[str]]:
    statefulset = named(docs, "StatefulSet", "postgres")
    template = statefulset["spec"]["template"]
    volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
    for mount in template["spec"]["containers"][0].get("volumeMounts", []):
        volume = volumes.get(mount["name"], {})
        if mount["mountPath"] == "/docker-entrypoint-initdb.d" and "configMap" in volume:
            scripts = named(docs, "ConfigMap", volume["configMap"]["name"])["data"]
            problems = [] if volume["configMap"].get("defaultMode", 0o644) & 0o111 else ["the init script is not executable"]
            found = [text for key, text in sorted(scripts.items()) if key.endswith(".sh")]
            return (found[0] if len(found) == 1 else None), problems
    return None, ["no init script is mounted into /docker-entrypoint-initdb.d"]


def _role_sql_problems(sql: str) -> list[str]:
    sql = re.sub(r"--[^\n]*|^\\[^\n]*", "", sql, flags=re.MULTILINE)  # comments, psql meta-commands
    statements = [" ".join(s.split()) for s in sql.split(";") if s.strip()]
    problems = []
    roles = [s for s in statements if re.match(r"CREATE (ROLE|USER) mlflow\b", s, re.IGNORECASE)]
    if len(roles) != 1:
        return [f"expected one CREATE ROLE mlflow, found {len(roles)}"]
    words = set(roles[0].upper().split())
    problems += [f"the role is not NO{a}" for a in ROLE_ATTRIBUTES if f"NO{a}" not in words or a in words]
    if "LOGIN" not in words:
        problems.append("the role cannot log in")
    if not re.search(r"PASSWORD :'\w+'", roles[0]):
        problems.append("the role's password is not the psql variable read from the environment")
    for database in ("mlflow", "mlflow_auth"):
        if f"CREATE DATABASE {database} OWNER mlflow" not in statements:
            problems.append(f"database {database} is not created with owner mlflow")
    for statement in statements:
        if re.match(r"(ALTER (ROLE|USER) mlflow|GRANT .* TO mlflow)\b", statement, re.IGNORECASE):
            problems.append(f"MLflow's role gets more: {statement}")
    return problems


def postgres_role_problems(docs: list[dict[str, Any]]) -> list[str]:
    postgres = named(docs, "StatefulSet", "postgres")["spec"]["template"]["spec"]["containers"][0]
    env = env_of(postgres)
    superuser = env.get("POSTGRES_USER", {}).get("value", "postgres")
    problems = _problems_of(
        f"the superuser is {superuser}: MLflow's role" if superuser == "mlflow" else None,
        "POSTGRES_DB makes the superuser own an MLflow database"
        if env.get("POSTGRES_DB", {}).get("value") in ("mlflow", "mlflow_auth") else None,
    )
    db_secret, mlflow_secret = _secret_ref(postgres, "MLFLOW_DB_PASSWORD"), _secret_ref(_mlflow_container(docs), "PGPASSWORD")
    if not db_secret or db_secret != mlflow_secret or db_secret == _secret_ref(postgres, "POSTGRES_PASSWORD"):
        problems.append(f"MLflow signs in with {mlflow_secret}, its role is created with {db_secret}")
    # what MLflow connects as: the role, to the databases the script gives it
    config = _auth_ini(docs)
    uris = [a.partition("=")[2] for a in _mlflow_container(docs)["args"] if a.startswith("--backend-store-uri=")]
    uris += [config["mlflow"]["database_uri"]] if config is not None and "mlflow" in config else []
    for uri in map(urlsplit, uris):
        if uri.username != "mlflow" or uri.path.lstrip("/") not in ("mlflow", "mlflow_auth"):
            problems.append(f"MLflow connects as {uri.username} to {uri.path}")
    script, mount_problems = _init_script(docs)
    if script is None:
        return problems + mount_problems + ["no single init script"]
    with tempfile.TemporaryDirectory() as tmp:
        calls, sql = _run_with_stub(script, "psql", {"POSTGRES_USER": superuser, "MLFLOW_DB_PASSWORD": DB_PASSWORD}, Path(tmp))
    if any(DB_PASSWORD in arg for call in calls for arg in call) or DB_PASSWORD in sql:
        problems.append("the password is on psql's command line or in the SQL")
    if not re.search(r"^\\getenv (\w+) MLFLOW_DB_PASSWORD$", sql, re.MULTILINE):
        problems.append("psql does not read MLFLOW_DB_PASSWORD from the environment")
    return problems + mount_problems + _role_sql_problems(sql)


# -- the reliability cases --------------------------------------------------------------------------------


@pytest.mark.reliability
def test_each_stage_holds_only_its_own_s3_keys(docs: list[dict[str, Any]]) -> None:
    """Each stage's pods read only their own stage's S3 Secret: preprocessing, training (the interactive cluster trains), MLflow; no other pod holds S3 keys."""
    assert not s3_secret_problems(docs), s3_secret_problems(docs)


@pytest.mark.reliability
def test_no_manifest_carries_a_literal_credential(docs: list[dict[str, Any]]) -> None:
    """No manifest carries a credential: secret-named settings come from Secrets, and no URI, config file, Secret or key id in the repository holds one."""
    assert not literal_credential_problems(docs), literal_credential_problems(docs)
    for path in sorted(p for p in K8S.rglob("*") if p.is_file()):
        text = path.read_text()
        assert "secretGenerator" not in text, f"{path}: secretGenerator would need secret values in the repo"
        assert not _AWS_KEY_ID.search(text) and "PRIVATE KEY-----" not in text, path
        if path.suffix in (".yaml", ".yml"):
            for doc in yaml.safe_load_all(text):
                if isinstance(doc, dict) and doc.get("kind") == "Secret":
                    assert not doc.get("data") and not doc.get("stringData"), f"{path}: Secret with values"


@pytest.mark.reliability
def test_mlflow_runs_its_basic_auth_app_and_clients_sign_in_from_secrets(docs: list[dict[str, Any]]) -> None:
    """MLflow serves only through its basic-auth app, admin and keys from Secrets, and every pod it admits signs in with a user and password from Secrets."""
    assert not mlflow_auth_problems(docs), mlflow_auth_problems(docs)


@pytest.mark.reliability
def test_postgres_gives_mlflow_a_role_that_owns_its_databases_and_nothing_more(docs: list[dict[str, Any]]) -> None:
    """PostgreSQL's init makes MLflow's role a non-superuser (no CREATEDB, CREATEROLE, replication, RLS bypass) that owns its two databases, and MLflow connects as it."""
    assert not postgres_role_problems(docs), postgres_role_problems(docs)


# -- supporting checks ------------------------------------------------------------------------------------


def test_the_basic_auth_app_is_what_the_mlflow_image_serves() -> None:
    """`--app-name` is an option of `mlflow server` (test_k8s_policy.py checks every argument against the
    CLI); `basic-auth` must name the installed MLflow's auth app, which the image can import."""
    entry_points = next(MLFLOW_SOURCE.parent.glob("mlflow-*.dist-info/entry_points.txt")).read_text()
    assert re.search(r"^\[mlflow\.app\]\nbasic-auth = mlflow\.server\.auth:create_app$", entry_points, re.MULTILINE)
    dockerfile = (K8S / "images/Dockerfile.mlflow").read_text()
    assert '"mlflow[auth]==${MLFLOW_VERSION}"' in dockerfile, "the basic-auth app needs the auth extra (Flask-WTF)"


class _RestException(Exception):
    """Stands for mlflow.exceptions.RestException: `error_code` is the error's name."""

    def __init__(self, error_code: str) -> None:
        super().__init__(error_code)
        self.error_code = error_code


class _FakeUsers:
    """The basic-auth app's client (AuthServiceClient), as the mlflow-create-user Job uses it."""

    def __init__(self, existing: set[str], error: str | None = None) -> None:
        self.existing, self.error, self.calls = existing, error, []

    def get_user(self, name: str) -> None:
        if self.error or name not in self.existing:
            raise _RestException(self.error or "RESOURCE_DOES_NOT_EXIST")

    def create_user(self, name: str, password: str) -> None:
        self.calls.append(("create", name, password))

    def update_user_password(self, name: str, password: str) -> None:
        self.calls.append(("update", name, password))


def test_the_mlflow_user_job_uses_the_installed_mlflows_client_api() -> None:
    """The names the Job's script calls, read from the installed MLflow (importing it takes seconds)."""
    entry_points = next(MLFLOW_SOURCE.parent.glob("mlflow-*.dist-info/entry_points.txt")).read_text()
    client_entry = r"^\[mlflow\.app\.client\]\nbasic-auth = mlflow\.server\.auth\.client:AuthServiceClient$"
    assert re.search(client_entry, entry_points, re.MULTILINE)
    server = (MLFLOW_SOURCE / "server/__init__.py").read_text()
    assert re.search(r"^def get_app_client\(app_name: str, \*args, \*\*kwargs\)", server, re.MULTILINE)
    client = (MLFLOW_SOURCE / "server/auth/client.py").read_text()
    for method in ("get_user(self, username: str)", "create_user(self, username: str, password: str)", "update_user_password("):
        assert f"def {method}" in client, method
    assert "def __init__(self, tracking_uri: str)" in client
    exceptions = (MLFLOW_SOURCE / "exceptions.py").read_text()
    assert "class RestException(MlflowException)" in exceptions and "self.error_code = ErrorCode.Name(" in exceptions


@pytest.mark.parametrize(("existing", "error", "expected"), [
    (set(), None, [("create", "mvit-pipeline", "client-password-0123")]),
    ({"mvit-pipeline"}, None, [("update", "mvit-pipeline", "client-password-0123")]),
    (set(), "PERMISSION_DENIED", None),
])  # fmt: skip
def test_the_mlflow_user_job_creates_or_resets_the_client_user(
    existing: set[str], error: str | None, expected: list[tuple[str, str, str]] | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = named(render("dev"), "Job", "mlflow-create-user")
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["python", "-c"] and container["image"].startswith("mvit-mlflow:")
    users = _FakeUsers(existing, error)
    opened: list[tuple[str, str]] = []
    server = types.ModuleType("mlflow.server")
    server.get_app_client = lambda app, tracking_uri: opened.append((app, tracking_uri)) or users
    exceptions = types.ModuleType("mlflow.exceptions")
    exceptions.RestException = _RestException
    monkeypatch.setitem(sys.modules, "mlflow.server", server)
    monkeypatch.setitem(sys.modules, "mlflow.exceptions", exceptions)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("CLIENT_USERNAME", "mvit-pipeline")
    monkeypatch.setenv("CLIENT_PASSWORD", "client-password-0123")
    code = compile(container["args"][0], "mlflow-create-user", "exec")
    if expected is None:
        with pytest.raises(_RestException):
            exec(code, {"__name__": "__main__"})
    else:
        exec(code, {"__name__": "__main__"})
        assert users.calls == expected
    assert opened == [("basic-auth", "http://mlflow:5000")]
    monkeypatch.setenv("CLIENT_USERNAME", "admin")  # the client user must not be the admin
    with pytest.raises(SystemExit):
        exec(code, {"__name__": "__main__"})
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
    assert env["MLFLOW_TRACKING_PASSWORD"] == {"name": "mvit-mlflow-auth", "key": "admin_password"}
    assert env["CLIENT_PASSWORD"] == {"name": "mvit-mlflow-client", "key": "password"}


def _policy_document(stage: str) -> dict[str, Any]:
    return json.loads((IAM / f"{stage}.json").read_text())


def _prefixes(stage: str, actions: set[str]) -> set[str]:
    """The object prefixes of mvit-data on which a stage's policy allows one of `actions`."""
    found = set()
    for statement in _policy_document(stage)["Statement"]:
        if set(statement["Action"]) & actions:
            found |= {r.removeprefix("arn:aws:s3:::mvit-data/").removesuffix("*") for r in statement["Resource"] if "/" in r}
    return found


def _covered(url: str, prefixes: set[str]) -> bool:
    key = url.removeprefix("s3://mvit-data/")
    return url.startswith("s3://mvit-data/") and any(f"{key}/".startswith(p) for p in prefixes)


def test_the_iam_policies_give_each_stage_its_own_prefixes() -> None:
    writes = {"s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"}
    assert {p.stem for p in IAM.glob("*.json")} == set(S3_SECRETS)
    for stage in S3_SECRETS:
        document = _policy_document(stage)
        assert document["Version"] == "2012-10-17"
        for statement in document["Statement"]:
            assert statement["Effect"] == "Allow" and all(a.startswith("s3:") and "*" not in a for a in statement["Action"])
            assert all(r == "arn:aws:s3:::mvit-data" or r.startswith("arn:aws:s3:::mvit-data/") for r in statement["Resource"])
            for prefix in statement.get("Condition", {}).get("StringLike", {}).get("s3:prefix", []):
                folder = f"{prefix.rstrip('*').rstrip('/')}/"  # a listing lies under the objects it may read
                assert any(folder.startswith(p) for p in _prefixes(stage, {"s3:GetObject"})), (stage, prefix)
    written = {stage: _prefixes(stage, writes) for stage in S3_SECRETS}
    assert all(written.values()) and len(set().union(*written.values())) == sum(map(len, written.values())), written
    # what the prod manifests read and write lies within their stage's policy, and nothing else's
    docs = render("prod")
    preprocess = named(docs, "RayJob", "mvit-preprocess")["spec"]["entrypoint"]
    train = named(docs, "RayJob", "mvit-train")["spec"]["entrypoint"]
    uses = {
        "preprocess": (re.findall(r"--(?:csv|videos) (s3://\S+)", preprocess), re.findall(r"--out (s3://\S+)", preprocess)),
        "train": (re.findall(r"data\.root=(s3://\S+)", train), re.findall(r"trainer\.storage_path=(s3://\S+)", train)),
        "mlflow": ([], [named(docs, "ConfigMap", "mlflow-server")["data"]["artifacts_destination"]]),
    }
    for stage, (reads, outputs) in uses.items():
        assert outputs and all(_covered(u, written[stage]) for u in outputs), (stage, outputs)
        assert all(_covered(u, _prefixes(stage, {"s3:GetObject"})) for u in reads), (stage, reads)
        others = set().union(*(w for s, w in written.items() if s != stage))
        assert not any(_covered(u, others) for u in outputs), (stage, "writes where another stage writes")


def test_dev_minio_gets_one_user_per_stage_with_its_policy(tmp_path: Path) -> None:
    docs = render("dev")
    policies = {f"{s}.json": (IAM / f"{s}.json").read_text() for s in S3_SECRETS}
    assert named(docs, "ConfigMap", "mvit-s3-policies")["data"] == policies
    container = named(docs, "Job", "minio-create-bucket")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    keys = {}
    for stage in S3_SECRETS:
        for part in ("ACCESS_KEY_ID", "SECRET_ACCESS_KEY"):
            var = f"{stage.upper()}_{part}"
            assert _secret_ref(container, var) == {"name": S3_SECRETS[stage], "key": part.lower()}, var
            keys[var] = f"{stage}-{part.lower()}"
    run_env = {**keys, "BUCKET": env["BUCKET"], "POLICY_DIR": str(IAM), "MINIO_ROOT_USER": "root",
               "MINIO_ROOT_PASSWORD": "root-password"}  # fmt: skip
    calls, _ = _run_with_stub(container["args"][0], "mc", run_env, tmp_path)
    assert ["mb", "--ignore-existing", "local/mvit-dev"] in calls
    for stage in S3_SECRETS:
        key, secret = keys[f"{stage.upper()}_ACCESS_KEY_ID"], keys[f"{stage.upper()}_SECRET_ACCESS_KEY"]
        created = [c for c in calls if c[:4] == ["admin", "policy", "create", "local"] and c[4] == f"mvit-{stage}"]
        assert len(created) == 1, (stage, calls)
        loaded = json.loads(Path(created[0][5]).read_text())
        assert loaded == json.loads((IAM / f"{stage}.json").read_text().replace(":::mvit-data", ":::mvit-dev"))
        assert ["admin", "user", "add", "local", key, secret] in calls
        assert ["admin", "policy", "attach", "local", f"mvit-{stage}", "--user", key] in calls


# -- each check fails on a manifest that breaks its rule ------------------------------------------------


def _ray_env(docs: list[dict[str, Any]], kind: str, name: str) -> list[dict[str, Any]]:
    return next(t for w, t in pod_templates(named(docs, kind, name)) if w.endswith(" head"))["spec"]["containers"][0]["env"]


def _set_env(env: list[dict[str, Any]], name: str, entry: dict[str, Any]) -> None:
    env[:] = [e for e in env if e["name"] != name] + [{"name": name, **entry}]


def _training_with_preprocessing_keys(docs: list[dict[str, Any]]) -> None:
    _set_env(_ray_env(docs, "RayJob", "mvit-train"), "AWS_SECRET_ACCESS_KEY",
             {"valueFrom": {"secretKeyRef": {"name": "mvit-s3-preprocess", "key": "secret_access_key"}}})  # fmt: skip


def _submitter_with_keys(docs: list[dict[str, Any]]) -> None:
    container = named(docs, "RayJob", "mvit-preprocess")["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
    container["envFrom"] = [{"secretRef": {"name": "mvit-s3-preprocess"}}]


def _one_key_for_all(docs: list[dict[str, Any]]) -> None:
    env = _mlflow_container(docs)["env"]
    _set_env(env, "AWS_ACCESS_KEY_ID", {"valueFrom": {"secretKeyRef": {"name": "mvit-s3-train", "key": "access_key_id"}}})


def _literal_db_password(docs: list[dict[str, Any]]) -> None:
    _set_env(_mlflow_container(docs)["env"], "PGPASSWORD", {"value": "hunter2hunter2"})


def _password_in_the_backend_uri(docs: list[dict[str, Any]]) -> None:
    args = _mlflow_container(docs)["args"]
    args[:] = [a.replace("//mlflow@", "//mlflow:hunter2hunter2@") for a in args]


def _admin_password_in_the_ini(docs: list[dict[str, Any]]) -> None:
    named(docs, "ConfigMap", "mlflow-auth")["data"]["basic_auth.ini"] += "admin_password = hunter2hunter2\n"


def _a_rendered_secret(docs: list[dict[str, Any]]) -> None:
    docs.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3"}, "stringData": {"k": "v"}})


def _no_auth_app(docs: list[dict[str, Any]]) -> None:
    _mlflow_container(docs)["args"].remove("--app-name=basic-auth")


def _client_without_password(docs: list[dict[str, Any]]) -> None:
    env = _ray_env(docs, "RayCluster", "mvit-interactive")
    env[:] = [e for e in env if e["name"] != "MLFLOW_TRACKING_PASSWORD"]


def _ray_signs_in_as_the_admin(docs: list[dict[str, Any]]) -> None:
    _set_env(_ray_env(docs, "RayJob", "mvit-train"), "MLFLOW_TRACKING_PASSWORD",
             {"valueFrom": {"secretKeyRef": {"name": "mvit-mlflow-auth", "key": "admin_password"}}})  # fmt: skip


def _users_in_sqlite(docs: list[dict[str, Any]]) -> None:
    data = named(docs, "ConfigMap", "mlflow-auth")["data"]
    data["basic_auth.ini"] = re.sub(r"database_uri = .*", "database_uri = sqlite:///basic_auth.db", data["basic_auth.ini"])


def _init_sql(docs: list[dict[str, Any]], old: str, new: str) -> None:
    data = named(docs, "ConfigMap", "postgres-init")["data"]
    (key,) = data
    assert old in data[key]
    data[key] = data[key].replace(old, new)


def _superuser_role(docs: list[dict[str, Any]]) -> None:
    _init_sql(docs, "NOSUPERUSER", "SUPERUSER")


def _role_creates_databases(docs: list[dict[str, Any]]) -> None:
    _init_sql(docs, " NOCREATEDB", " CREATEDB")


def _superuser_owns_the_database(docs: list[dict[str, Any]]) -> None:
    _init_sql(docs, "CREATE DATABASE mlflow_auth OWNER mlflow", "CREATE DATABASE mlflow_auth")


def _role_granted_more(docs: list[dict[str, Any]]) -> None:
    owner = "CREATE DATABASE mlflow OWNER mlflow;"
    _init_sql(docs, owner, f"{owner}\nGRANT pg_read_all_data TO mlflow;")


def _literal_role_password(docs: list[dict[str, Any]]) -> None:
    _init_sql(docs, "PASSWORD :'mlflow_password'", "PASSWORD 'hunter2hunter2'")


def _mlflow_is_the_superuser(docs: list[dict[str, Any]]) -> None:
    env = named(docs, "StatefulSet", "postgres")["spec"]["template"]["spec"]["containers"][0]["env"]
    _set_env(env, "POSTGRES_USER", {"value": "mlflow"})


def _mlflow_connects_as_postgres(docs: list[dict[str, Any]]) -> None:
    args = _mlflow_container(docs)["args"]
    args[:] = [a.replace("//mlflow@", "//postgres@") for a in args]


@pytest.mark.parametrize(
    ("breakage", "check"),
    [
        (_training_with_preprocessing_keys, s3_secret_problems),
        (_submitter_with_keys, s3_secret_problems),
        (_one_key_for_all, s3_secret_problems),
        (_literal_db_password, literal_credential_problems),
        (_password_in_the_backend_uri, literal_credential_problems),
        (_admin_password_in_the_ini, literal_credential_problems),
        (_a_rendered_secret, literal_credential_problems),
        (_no_auth_app, mlflow_auth_problems),
        (_client_without_password, mlflow_auth_problems),
        (_ray_signs_in_as_the_admin, mlflow_auth_problems),
        (_users_in_sqlite, mlflow_auth_problems),
        (_admin_password_in_the_ini, mlflow_auth_problems),
        (_superuser_role, postgres_role_problems),
        (_role_creates_databases, postgres_role_problems),
        (_superuser_owns_the_database, postgres_role_problems),
        (_role_granted_more, postgres_role_problems),
        (_literal_role_password, postgres_role_problems),
        (_mlflow_is_the_superuser, postgres_role_problems),
        (_mlflow_connects_as_postgres, postgres_role_problems),
    ],
    ids=lambda v: v.__name__.strip("_"),
)
def test_each_credential_check_fails_on_a_manifest_that_breaks_its_rule(breakage: Any, check: Any) -> None:
    assert_check_catches(breakage, check)
