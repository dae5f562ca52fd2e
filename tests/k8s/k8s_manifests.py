"""Renders the Kubernetes overlays (once per session) and walks the rendered manifests.

The tests read nothing outside this repository. Rendering needs `kubectl` (>= 1.27, which bundles
kustomize v5); without it the tests fail with a message saying how to install it.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
# Every overlay in the tree is rendered and checked (a new one is picked up without touching the tests).
OVERLAYS = tuple(sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml")))
# Core resources are validated against this Kubernetes version's OpenAPI schemas (kubernetes-validate,
# whose 1.37 release ships the schemas of Kubernetes 1.25 to 1.37).
KUBERNETES_VERSION = "1.32.0"
PROJECT_IMAGES = ("mvit-cpu", "mvit-gpu", "mvit-mlflow")
# Secrets the Ray node containers receive (env name -> (Secret, key)), never via runtimeEnvYAML: the
# Ray token on every node; the MLflow client's address and user on the nodes of the clusters that log
# runs; each stage's own S3 keys (the interactive cluster runs training jobs: the training keys).
RAY_AUTH_SECRET = ("mvit-ray-auth", "auth_token")
MLFLOW_CLIENT_ENV = {
    "MLFLOW_TRACKING_URI": ("mvit-tracking", "tracking_uri"),
    "MLFLOW_TRACKING_USERNAME": ("mvit-mlflow-client", "username"),
    "MLFLOW_TRACKING_PASSWORD": ("mvit-mlflow-client", "password"),
}
MLFLOW_CLIENT_CLUSTERS = ("mvit-train", "mvit-interactive")
S3_SECRETS = {"preprocess": "mvit-s3-preprocess", "train": "mvit-s3-train", "mlflow": "mvit-s3-mlflow"}
S3_STAGE_OF_CLUSTER = {"mvit-preprocess": "preprocess", "mvit-train": "train", "mvit-interactive": "train"}


def s3_env(stage: str) -> dict[str, tuple[str, str]]:
    """The AWS_* variables of a stage's pods, from that stage's Secret."""
    secret = S3_SECRETS[stage]
    return {"AWS_ACCESS_KEY_ID": (secret, "access_key_id"), "AWS_SECRET_ACCESS_KEY": (secret, "secret_access_key")}


SECRET_LIKE_NAME = re.compile(r"(PASSWORD|PASSWD|SECRET|TOKEN|ACCESS_KEY|CREDENTIAL)", re.IGNORECASE)

_KUBECTL_MISSING = (
    "kubectl is not on PATH. The k8s tests render k8s/overlays/* with `kubectl kustomize` "
    "(kubectl >= 1.27 bundles kustomize v5). Install kubectl "
    "(https://kubernetes.io/docs/tasks/tools/; on Debian/Ubuntu `apt-get install kubectl` from the "
    "Kubernetes apt repository) and rerun."
)
_rendered: dict[str, list[dict[str, Any]]] = {}


def render(overlay: str) -> list[dict[str, Any]]:
    """`kubectl kustomize k8s/overlays/<overlay>` as a list of resources (cached per session)."""
    if overlay not in _rendered:
        kubectl = shutil.which("kubectl")
        if kubectl is None:
            pytest.fail(_KUBECTL_MISSING, pytrace=False)
        result = subprocess.run(
            [kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=120
        )
        if result.returncode != 0:
            pytest.fail(f"kubectl kustomize k8s/overlays/{overlay} failed:\n{result.stderr}", pytrace=False)
        _rendered[overlay] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return _rendered[overlay]


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def named(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def is_ray(doc: dict[str, Any]) -> bool:
    return doc["apiVersion"].startswith("ray.io/")


def cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    """The RayClusterSpec of a RayJob or a RayCluster."""
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def ray_node_templates(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], dict[str, str]]]:
    """(role, pod template, rayStartParams) for the head and each worker group of a Ray resource."""
    spec = cluster_spec(doc)
    yield "head", spec["headGroupSpec"]["template"], spec["headGroupSpec"]["rayStartParams"]
    for group in spec.get("workerGroupSpecs", []):
        yield f"worker:{group['groupName']}", group["template"], group["rayStartParams"]


def pod_templates(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod template) for every pod a resource creates: core workloads and Ray resources."""
    name = f"{doc['kind']}/{doc['metadata']['name']}"
    if is_ray(doc):
        for role, template, _ in ray_node_templates(doc):
            yield f"{name} {role}", template
        if doc["kind"] == "RayJob" and "submitterPodTemplate" in doc["spec"]:
            yield f"{name} submitter", doc["spec"]["submitterPodTemplate"]
    elif doc["kind"] in ("Deployment", "StatefulSet", "Job"):
        yield name, doc["spec"]["template"]


def containers(template: dict[str, Any]) -> list[dict[str, Any]]:
    spec = template["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


_QUANTITY = re.compile(r"^([0-9.]+)([KMGTPE]i?|[kmu])?$")
_FACTOR = {None: 1, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity_bytes(value: str | int) -> float:
    """'52Gi' -> bytes; a bare number is bytes."""
    match = _QUANTITY.match(str(value))
    assert match and match.group(2) in _FACTOR, f"unsupported quantity {value!r}"
    return float(match.group(1)) * _FACTOR[match.group(2)]


def secret_refs(template: dict[str, Any]) -> set[str]:
    """The Secrets a pod template reads: env secretKeyRefs, envFrom secretRefs and secret volumes."""
    names: set[str] = set()
    for container in containers(template):
        for entry in container.get("env", []):
            ref = entry.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                names.add(ref["name"])
        names |= {e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e}
    for volume in template["spec"].get("volumes", []):
        if "secret" in volume:
            names.add(volume["secret"]["secretName"])
        for source in volume.get("projected", {}).get("sources", []):
            if "secret" in source:
                names.add(source["secret"]["name"])
    return names


Docs = list[dict[str, Any]]


def assert_check_catches(breakage: Callable[[Docs], None], check: Callable[[Docs], list[str]]) -> None:
    """`check` passes the rendered prod overlay and reports problems once `breakage` has changed a copy of it."""
    docs = copy.deepcopy(render("prod"))
    assert not check(docs), f"the rendered prod overlay should pass {check.__name__} before it is broken"
    breakage(docs)
    assert check(docs), f"{check.__name__} accepted the manifests with {breakage.__name__.strip('_')}"
