"""What the deployment promises, checked on the rendered overlays: the Ray cluster shape, each Ray
node's credentials from Secrets, non-root pods with resource limits, the MLflow server's shape. Network
isolation and service-account tokens: test_k8s_isolation.py; credentials: test_k8s_credentials.py."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

import yaml
from k8s_manifests import (
    MLFLOW_CLIENT_CLUSTERS,
    MLFLOW_CLIENT_ENV,
    RAY_AUTH_SECRET,
    S3_STAGE_OF_CLUSTER,
    cluster_spec,
    containers,
    env_of,
    is_ray,
    named,
    of_kind,
    pod_templates,
    quantity_bytes,
    ray_node_templates,
    render,
    s3_env,
)


def _ray_docs(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if is_ray(d)]


def test_ray_head_does_no_training_work_and_uses_token_auth(docs: list[dict[str, Any]]) -> None:
    for doc in _ray_docs(docs):
        spec = cluster_spec(doc)
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0", doc["metadata"]["name"]
        assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
        ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
        assert ports["dashboard"] == 8265
        assert spec["authOptions"] == {"mode": "token", "secretName": RAY_AUTH_SECRET[0]}


def test_worker_groups_autoscale_between_min_and_max(docs: list[dict[str, Any]]) -> None:
    for doc in _ray_docs(docs):
        spec = cluster_spec(doc)
        assert spec["enableInTreeAutoscaling"] is True
        assert spec["workerGroupSpecs"], f"{doc['metadata']['name']} has no worker group"
        for group in spec["workerGroupSpecs"]:
            assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], group["groupName"]
            assert group["maxReplicas"] >= 1


def test_job_drivers_can_be_placed(docs: list[dict[str, Any]]) -> None:
    """A driver that asks for resources no node group advertises would wait forever."""
    for job in of_kind(docs, "RayJob"):
        groups = cluster_spec(job).get("workerGroupSpecs", [])
        advertised: set[str] = set()
        for group in groups:
            if "resources" in group["rayStartParams"]:  # KubeRay's format: a quoted JSON object
                advertised |= set(json.loads(json.loads(group["rayStartParams"]["resources"])))
        wanted = set(json.loads(job["spec"].get("entrypointResources", "{}")))
        assert wanted <= advertised, f"{job['metadata']['name']}: no worker group offers {wanted - advertised}"
        if job["spec"].get("entrypointNumCpus", 0) > 0:
            assert groups, f"{job['metadata']['name']}: the driver needs CPUs and the head has none"


def test_rayjobs_delete_their_cluster_after_a_ttl(docs: list[dict[str, Any]]) -> None:
    for job in of_kind(docs, "RayJob"):
        assert job["spec"]["shutdownAfterJobFinishes"] is True
        assert job["spec"]["ttlSecondsAfterFinished"] > 0


def test_every_ray_node_gets_its_stages_credentials_from_secrets(docs: list[dict[str, Any]]) -> None:
    """The Ray token everywhere, the stage's own S3 keys, MLflow's address and user where the cluster logs."""
    for doc in _ray_docs(docs):
        name = doc["metadata"]["name"]
        wanted = {"RAY_AUTH_TOKEN": RAY_AUTH_SECRET, **s3_env(S3_STAGE_OF_CLUSTER[name])}
        if name in MLFLOW_CLIENT_CLUSTERS:
            wanted |= MLFLOW_CLIENT_ENV
        for role, template, _ in ray_node_templates(doc):
            for container in template["spec"]["containers"]:
                env = env_of(container)
                where = f"{name} {role} {container['name']}"
                assert env["RAY_AUTH_MODE"].get("value") == "token", where
                for var, (secret, key) in wanted.items():
                    assert env[var].get("valueFrom", {}).get("secretKeyRef") == {"name": secret, "key": key}, (where, var)
                unused = {v for v in env if v.startswith("MLFLOW_")} - set(wanted)
                assert not unused, f"{where}: MLflow settings it has no use for: {unused}"
        if doc["kind"] == "RayJob":  # the submitter talks to the dashboard, so it needs the token too
            submitter = env_of(doc["spec"]["submitterPodTemplate"]["spec"]["containers"][0])
            assert submitter["RAY_AUTH_MODE"]["value"] == "token"
            assert submitter["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "mvit-ray-auth"


def test_runtime_env_carries_no_secrets(docs: list[dict[str, Any]]) -> None:
    for job in of_kind(docs, "RayJob"):
        text = job["spec"].get("runtimeEnvYAML", "")
        runtime_env = yaml.safe_load(text) or {}
        assert set(runtime_env) <= {"working_dir", "env_vars", "excludes"}, runtime_env
        for forbidden in ("AWS_", "MLFLOW_TRACKING", "RAY_AUTH", "PASSWORD", "SECRET", "TOKEN"):
            assert forbidden not in text.upper(), f"{job['metadata']['name']}: runtimeEnvYAML mentions {forbidden}"


def test_gpu_workers_request_gpus_tolerate_the_taint_and_use_the_gpu_image() -> None:
    for doc in _ray_docs(render("prod")):
        if doc["metadata"]["name"] == "mvit-preprocess":
            continue
        groups = {g["groupName"]: g for g in cluster_spec(doc)["workerGroupSpecs"]}
        # the training job also trains on spot GPUs (patches/spot-gpu-workers.yaml)
        gpu_groups = {"gpu-workers", "gpu-spot-workers"} if doc["metadata"]["name"] == "mvit-train" else {"gpu-workers"}
        assert set(groups) == {"cpu-workers"} | gpu_groups
        for name in gpu_groups:
            pod = groups[name]["template"]["spec"]
            resources = pod["containers"][0]["resources"]
            assert int(resources["limits"]["nvidia.com/gpu"]) >= 1, name
            assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"], name
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"], name
            assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}, name
            assert pod["containers"][0]["image"].rsplit("/", 1)[-1].startswith("mvit-gpu:"), name
        cpu_pod = groups["cpu-workers"]["template"]["spec"]
        assert "nvidia.com/gpu" not in cpu_pod["containers"][0]["resources"]["limits"]


def test_dev_is_cpu_only() -> None:
    for doc in render("dev"):
        text = yaml.safe_dump(doc)
        assert "nvidia.com/gpu" not in text and "mvit-gpu" not in text, f"{doc['kind']}/{doc['metadata']['name']}"


def test_shm_holds_the_object_store(docs: list[dict[str, Any]]) -> None:
    for doc in _ray_docs(docs):
        for role, template, params in ray_node_templates(doc):
            spec = template["spec"]
            mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
            volumes = {v["name"]: v for v in spec["volumes"]}
            shm = volumes[mounts["/dev/shm"]]["emptyDir"]
            where = f"{doc['metadata']['name']} {role}"
            assert shm["medium"] == "Memory", where
            store = int(params["object-store-memory"])
            assert store <= quantity_bytes(shm["sizeLimit"]), f"{where}: object store larger than /dev/shm"
            memory = quantity_bytes(spec["containers"][0]["resources"]["limits"]["memory"])
            assert quantity_bytes(shm["sizeLimit"]) <= 0.5 * memory, f"{where}: /dev/shm takes over half the memory"


def test_pods_run_as_non_root_with_limits_and_a_read_only_root(docs: list[dict[str, Any]]) -> None:
    checked = 0
    for doc in docs:
        for where, template in pod_templates(doc):
            pod_security = template["spec"].get("securityContext", {})
            assert pod_security.get("seccompProfile") == {"type": "RuntimeDefault"}, where
            for container in containers(template):
                security = {**pod_security, **container.get("securityContext", {})}
                name = f"{where} {container['name']}"
                assert security.get("runAsNonRoot") is True and security.get("runAsUser", 0) != 0, name
                assert security.get("allowPrivilegeEscalation") is False, name
                assert security.get("readOnlyRootFilesystem") is True, name
                assert security.get("capabilities", {}).get("drop") == ["ALL"], name
                for kind in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(container["resources"].get(kind, {})), f"{name}: {kind}"
                mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
                assert "/tmp" in mounts, f"{name}: no writable /tmp beside the read-only root"
                checked += 1
    for doc in _ray_docs(docs):  # the autoscaler sidecar KubeRay injects into the head pod
        options = cluster_spec(doc)["autoscalerOptions"]
        assert options["securityContext"]["readOnlyRootFilesystem"] is True
        assert options["securityContext"]["allowPrivilegeEscalation"] is False
        assert {"cpu", "memory"} <= set(options["resources"]["limits"])
    assert checked >= 12


def test_mlflow_server_proxies_artifacts_to_s3_with_postgres_and_allowed_hosts(docs: list[dict[str, Any]]) -> None:
    from mlflow.cli import server as mlflow_server

    deployment = named(docs, "Deployment", "mlflow")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["mlflow"] and container["args"][0] == "server"
    args = dict(a.partition("=")[::2] for a in container["args"][1:])
    known = {opt for p in mlflow_server.params for opt in p.opts}
    assert set(args) <= known, f"not options of `mlflow server`: {set(args) - known}"

    backend = urlsplit(args["--backend-store-uri"])
    assert backend.scheme.startswith("postgresql") and backend.password is None
    assert (backend.hostname, backend.port) == ("postgres", 5432)
    postgres_service = named(docs, "Service", "postgres")
    assert postgres_service["spec"]["ports"][0]["port"] == 5432
    assert "--serve-artifacts" in args
    env = env_of(container)
    assert args["--artifacts-destination"] == "$(ARTIFACTS_DESTINATION)"
    ref = env["ARTIFACTS_DESTINATION"]["valueFrom"]["configMapKeyRef"]
    assert named(docs, "ConfigMap", ref["name"])["data"][ref["key"]].startswith("s3://")

    hosts = args["--allowed-hosts"].split(",")
    assert {"mlflow:5000", "mlflow.$(POD_NAMESPACE).svc.cluster.local:5000", "localhost:5000"} <= set(hosts)
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    for name in ("PGPASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "secretKeyRef" in env[name]["valueFrom"], name

    service = named(docs, "Service", "mlflow")
    assert service["spec"]["ports"][0]["port"] == 5000
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_postgres_keeps_its_data_on_a_volume_claim(docs: list[dict[str, Any]]) -> None:
    statefulset = named(docs, "StatefulSet", "postgres")
    claims = {c["metadata"]["name"] for c in statefulset["spec"]["volumeClaimTemplates"]}
    mounts = {m["name"] for m in statefulset["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert "data" in claims & mounts
    env = env_of(statefulset["spec"]["template"]["spec"]["containers"][0])
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "mvit-postgres", "key": "password"}


def test_every_resource_belongs_to_a_deployment_stage(docs: list[dict[str, Any]]) -> None:
    stages = {"platform", "preprocess", "train", "interactive"}
    for doc in docs:
        labels = doc["metadata"].get("labels", {})
        assert labels.get("mvit-stage") in stages, f"{doc['kind']}/{doc['metadata']['name']}"
        assert labels.get("app.kubernetes.io/part-of") == "mvit"
