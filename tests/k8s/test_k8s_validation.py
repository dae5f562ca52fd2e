"""Every overlay renders, and every resource is valid: core kinds against Kubernetes' own OpenAPI
schemas (kubernetes-validate --strict, KUBERNETES_VERSION), RayJob/RayCluster against the project's
JSON schema of the KubeRay v1 fields it uses, and the pods inside them against the core PodTemplate
schema."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
from k8s_manifests import KUBERNETES_VERSION, is_ray, of_kind, pod_templates, render

SCHEMA = json.loads((Path(__file__).with_name("kuberay_v1_schema.json")).read_text())


def _kuberay_errors(doc: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft202012Validator(SCHEMA)
    # oneOf hides the real cause; validate against the matching kind's definition directly
    definition = {"$ref": f"#/$defs/{doc.get('kind')}", "$defs": SCHEMA["$defs"]}
    errors = jsonschema.Draft202012Validator(definition).iter_errors(doc) if doc.get("kind") in SCHEMA["$defs"] else []
    found = [f"{list(e.absolute_path)}: {e.message}" for e in errors]
    if not found and not validator.is_valid(doc):
        found.append("does not match the KubeRay schema")
    return found


def test_every_overlay_renders_the_whole_system(docs: list[dict[str, Any]], overlay: str) -> None:
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    expected = {
        ("Namespace", f"mvit-{overlay}" if overlay == "dev" else "mvit"),
        ("RayJob", "mvit-train"),
        ("RayJob", "mvit-preprocess"),
        ("RayCluster", "mvit-interactive"),
        ("Deployment", "mlflow"),
        ("Service", "mlflow"),
        ("StatefulSet", "postgres"),
        ("Service", "postgres"),
        ("ConfigMap", "mvit-env"),
        ("ConfigMap", "mlflow-server"),
        ("ConfigMap", "mlflow-auth"),
        ("ConfigMap", "postgres-init"),
        ("Job", "mlflow-create-user"),
        ("NetworkPolicy", "default-deny"),
        ("ServiceAccount", "mvit-train-autoscaler"),
        ("ServiceAccount", "mvit-preprocess-autoscaler"),
        ("ServiceAccount", "mvit-interactive-autoscaler"),
    }
    if overlay == "dev":
        expected |= {("Deployment", "minio"), ("Service", "minio"), ("Job", "minio-create-bucket"),
                     ("ConfigMap", "mvit-s3-policies")}
    assert expected <= names, f"missing from {overlay}: {sorted(expected - names)}"
    namespaces = {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"}
    assert namespaces == {named_ns for (kind, named_ns) in names if kind == "Namespace"}


def test_core_resources_pass_kubernetes_validate_strict(docs: list[dict[str, Any]]) -> None:
    core = [d for d in docs if not is_ray(d)]
    assert len(core) >= 9
    for doc in core:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {err.message} at {list(err.path)}")


def test_pods_inside_ray_resources_pass_the_core_pod_template_schema(docs: list[dict[str, Any]]) -> None:
    checked = 0
    for doc in filter(is_ray, docs):
        for where, template in pod_templates(doc):
            wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template}
            try:
                kubernetes_validate.validate(wrapped, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as err:
                pytest.fail(f"{where}: {err.message} at {list(err.path)}")
            checked += 1
    assert checked >= 8


def test_ray_resources_match_the_kuberay_v1_schema(docs: list[dict[str, Any]]) -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    ray_docs = [d for d in docs if is_ray(d)]
    assert {d["kind"] for d in ray_docs} == {"RayJob", "RayCluster"}
    for doc in ray_docs:
        errors = _kuberay_errors(doc)
        assert not errors, f"{doc['kind']}/{doc['metadata']['name']}:\n" + "\n".join(errors)


@pytest.mark.parametrize(
    "mutation",
    [
        "unknown spec field",
        "integer rayStartParam",
        "unknown submission mode",
        "worker group without maxReplicas",
        "auth mode typo",
        "apiVersion v1alpha1",
        "backoffLimit as a string",
        "negative backoffLimit",
    ],
)
def test_the_kuberay_schema_rejects_what_kuberay_would(mutation: str) -> None:
    job = copy.deepcopy(of_kind(render("prod"), "RayJob")[0])
    spec = job["spec"]["rayClusterSpec"]
    if mutation == "unknown spec field":
        job["spec"]["shutdownAfterJobFinish"] = True
    elif mutation == "integer rayStartParam":
        spec["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    elif mutation == "unknown submission mode":
        job["spec"]["submissionMode"] = "K8sMode"
    elif mutation == "worker group without maxReplicas":
        del spec["workerGroupSpecs"][0]["maxReplicas"]
    elif mutation == "auth mode typo":
        spec["authOptions"]["mode"] = "Token"
    elif mutation == "backoffLimit as a string":
        job["spec"]["backoffLimit"] = "3"
    elif mutation == "negative backoffLimit":
        job["spec"]["backoffLimit"] = -1
    else:
        job["apiVersion"] = "ray.io/v1alpha1"
    assert _kuberay_errors(job), f"the schema accepted a RayJob with {mutation}"


def test_strict_core_validation_is_effective() -> None:
    deployment = copy.deepcopy(next(d for d in render("dev") if d["kind"] == "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContex"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
