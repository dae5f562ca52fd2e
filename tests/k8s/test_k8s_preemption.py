"""Preemption and retries (docs/deployment.md, "Preemption and retries"), checked on the rendered
overlays: a failed RayJob is retried on a new Ray cluster and its rerun resumes from storage; in prod
the pods whose loss ends the job (Ray heads, submitters, the GPU group the training driver runs on)
stay off spot nodes while training GPUs may use them, and GPU workers get a termination grace with a
Ray drain window inside it, so the trainer hears of a reclaim and can checkpoint.

Each check returns its problems, so the last tests can show that every check fails on a manifest
that breaks its rule."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import shlex
from typing import Any

import kubernetes_validate
import pytest
import yaml
from k8s_manifests import KUBERNETES_VERSION, REPO, cluster_spec, env_of, is_ray, named, of_kind, render

# The node labels that say "spot" on AWS: EKS managed node groups and Karpenter set one of them.
SPOT_NODES = ({"eks.amazonaws.com/capacityType": "SPOT"}, {"karpenter.sh/capacity-type": "spot"})
ON_DEMAND_NODES = ({"eks.amazonaws.com/capacityType": "ON_DEMAND"}, {"karpenter.sh/capacity-type": "on-demand"}, {})
CAPACITY_KEYS = {key for node in SPOT_NODES + ON_DEMAND_NODES for key in node}
MAX_RETRIES = 5  # a job that fails for good reruns 1 + backoffLimit times, each on a fresh cluster
SPOT_NOTICE_S = 120  # AWS's spot interruption notice: a longer grace would never be granted
RAY_DEFAULT_DRAIN_S = 30  # Ray 2.60's RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S default (ray._private.ray_constants)
RAY_TEARDOWN_S = 10  # left between the end of the drain and Kubernetes' SIGKILL for Ray to stop its processes
DRAIN_ENV = "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"


# -- node affinity, evaluated the way the scheduler does -----------------------------------------------


def _expression_matches(expression: dict[str, Any], labels: dict[str, str]) -> bool:
    key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
    if operator == "In":
        return key in labels and labels[key] in values
    if operator == "NotIn":  # a node without the label matches NotIn
        return key not in labels or labels[key] not in values
    if operator == "Exists":
        return key in labels
    if operator == "DoesNotExist":
        return key not in labels
    raise AssertionError(f"node affinity operator {operator!r} is not evaluated by these tests")


def schedulable_on(pod: dict[str, Any], capacity: dict[str, str]) -> bool:
    """Whether the pod's nodeSelector and required node affinity admit a node with the labels the pod
    selects (GPU pool and such) plus ``capacity`` (its spot / on-demand label, if any)."""
    selector = pod.get("nodeSelector", {})
    labels = {k: v for k, v in selector.items() if k not in CAPACITY_KEYS} | capacity
    if any(labels.get(k) != v for k, v in selector.items()):
        return False
    required = pod.get("affinity", {}).get("nodeAffinity", {}).get("requiredDuringSchedulingIgnoredDuringExecution")
    if required is None:
        return True
    terms = required["nodeSelectorTerms"]
    assert all("matchFields" not in term for term in terms), "matchFields is not evaluated by these tests"
    return any(all(_expression_matches(e, labels) for e in term.get("matchExpressions", [])) for term in terms)


def avoids_spot(pod: dict[str, Any]) -> bool:
    return not any(schedulable_on(pod, node) for node in SPOT_NODES) and all(
        schedulable_on(pod, node) for node in ON_DEMAND_NODES
    )


# -- what the checks look at ---------------------------------------------------------------------------


def _advertised(group: dict[str, Any]) -> set[str]:
    params = group["rayStartParams"]
    return set(json.loads(json.loads(params["resources"]))) if "resources" in params else set()


def driver_groups(job: dict[str, Any]) -> list[dict[str, Any]]:
    """The worker groups a RayJob's driver may be placed on (entrypointResources); none: it runs on the head."""
    wanted = set(json.loads(job["spec"].get("entrypointResources", "{}")))
    if not wanted:
        return []
    return [g for g in cluster_spec(job)["workerGroupSpecs"] if wanted <= _advertised(g)]


def gpu_groups(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        g
        for g in cluster_spec(doc)["workerGroupSpecs"]
        if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"].get("limits", {})
    ]


def pods_that_must_not_be_preempted(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(where, pod spec) of every pod whose loss ends the job: the head (the cluster's GCS), a RayJob's
    submitter and the groups its driver may run on; a RayCluster's GPU workers, where the drivers
    submitted with --entrypoint-resources run."""
    spec = cluster_spec(doc)
    pods = [("head", spec["headGroupSpec"]["template"]["spec"])]
    if doc["kind"] == "RayJob":
        pods.append(("submitter", doc["spec"]["submitterPodTemplate"]["spec"]))
        pods += [(f"driver group {g['groupName']}", g["template"]["spec"]) for g in driver_groups(doc)]
    else:
        pods += [(f"driver group {g['groupName']}", g["template"]["spec"]) for g in gpu_groups(doc)]
    return pods


# -- the checks ----------------------------------------------------------------------------------------


def retry_problems(job: dict[str, Any]) -> list[str]:
    """KubeRay retries a failed RayJob `backoffLimit` times, each on a new RayCluster (KubeRay >= 1.2).
    It refuses backoffLimit > 0 with clusterSelector or InteractiveMode, and only K8sJobMode resubmits the
    same entrypoint by itself."""
    spec, problems = job["spec"], []
    limit = spec.get("backoffLimit", 0)
    if not (isinstance(limit, int) and 1 <= limit <= MAX_RETRIES):
        problems.append(f"backoffLimit {limit!r}: want 1..{MAX_RETRIES} retries")
    if spec.get("submissionMode", "K8sJobMode") != "K8sJobMode":
        problems.append(f"submissionMode {spec['submissionMode']!r}: retries are set up for K8sJobMode")
    if "clusterSelector" in spec or "rayClusterSpec" not in spec:
        problems.append("a retry needs a RayCluster of its own (rayClusterSpec, no clusterSelector)")
    if spec.get("activeDeadlineSeconds") is not None:
        problems.append("activeDeadlineSeconds: a RayJob failed by its deadline is never retried")
    return problems


def resume_problems(job: dict[str, Any]) -> list[str]:
    """A retry reruns the same entrypoint on a new cluster: it resumes only if that entrypoint resolves
    to the same job name and a storage path the new cluster can read (not a pod's disk)."""
    from pipeline.trainer.job import main

    entrypoint = job["spec"]["entrypoint"]
    if any(c in entrypoint for c in "$`"):
        return ["the entrypoint expands shell variables: a retry may name another job or storage path"]
    tokens = shlex.split(entrypoint)
    assert tokens[:3] == ["python", "pipeline/train.py", "--config"], tokens
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # the real CLI resolves the config (the preset is relative to the repo)
        assert main(["--config", str(REPO / tokens[3]), *tokens[4:], "--print-config"]) == 0
    resolved = yaml.safe_load(out.getvalue())
    problems = []
    if not resolved["name"]:
        problems.append("no job name: checkpoints would have no folder to be found in")
    if not resolved["trainer"]["storage_path"].startswith("s3://"):
        problems.append(f"trainer.storage_path {resolved['trainer']['storage_path']!r}: a new cluster cannot read it")
    return problems


def spot_problems(doc: dict[str, Any]) -> list[str]:
    problems = [
        f"{where} may land on a spot node" for where, pod in pods_that_must_not_be_preempted(doc) if not avoids_spot(pod)
    ]
    if doc["kind"] == "RayJob" and doc["metadata"]["name"] == "mvit-train":
        spot_capable = [g for g in gpu_groups(doc) if any(schedulable_on(g["template"]["spec"], n) for n in SPOT_NODES)]
        if not spot_capable:
            problems.append("no GPU group of the training job may use spot nodes")
        for group in spot_capable:
            if set(json.loads(doc["spec"].get("entrypointResources", "{}"))) & _advertised(group):
                problems.append(f"{group['groupName']} may use spot nodes and offers the driver's resource")
    return problems


def grace_problems(doc: dict[str, Any]) -> list[str]:
    """Each GPU worker pod: a termination grace within the spot notice, and Ray's SIGTERM drain (which
    Ray Train reports to the trainer through ray.train.get_preemption_info()) widened inside it."""
    problems = []
    for group in gpu_groups(doc):
        pod, name = group["template"]["spec"], group["groupName"]
        grace = pod.get("terminationGracePeriodSeconds", 30)
        env = env_of(pod["containers"][0])
        drain = float(env[DRAIN_ENV]["value"]) if DRAIN_ENV in env else RAY_DEFAULT_DRAIN_S
        if not RAY_DEFAULT_DRAIN_S + RAY_TEARDOWN_S < grace <= SPOT_NOTICE_S:
            low = RAY_DEFAULT_DRAIN_S + RAY_TEARDOWN_S
            problems.append(f"{name}: terminationGracePeriodSeconds {grace}, want ({low}, {SPOT_NOTICE_S}]")
        if not RAY_DEFAULT_DRAIN_S < drain <= grace - RAY_TEARDOWN_S:
            problems.append(f"{name}: {DRAIN_ENV}={drain:g}, want ({RAY_DEFAULT_DRAIN_S}, grace {grace} - {RAY_TEARDOWN_S}]")
    return problems


# -- the tests -----------------------------------------------------------------------------------------


def test_rayjobs_are_retried_on_a_new_cluster(docs: list[dict[str, Any]]) -> None:
    jobs = of_kind(docs, "RayJob")
    assert {j["metadata"]["name"] for j in jobs} == {"mvit-train", "mvit-preprocess"}
    for job in jobs:
        assert not retry_problems(job), (job["metadata"]["name"], retry_problems(job))


def test_a_retried_training_job_resumes_from_storage(docs: list[dict[str, Any]]) -> None:
    problems = resume_problems(named(docs, "RayJob", "mvit-train"))
    assert not problems, problems


def test_prod_heads_submitters_and_drivers_avoid_spot_and_training_gpus_may_use_it() -> None:
    ray_docs = [d for d in render("prod") if is_ray(d)]
    assert {(d["kind"], d["metadata"]["name"]) for d in ray_docs} == {
        ("RayJob", "mvit-train"), ("RayJob", "mvit-preprocess"), ("RayCluster", "mvit-interactive")}
    for doc in ray_docs:
        assert not spot_problems(doc), (doc["metadata"]["name"], spot_problems(doc))
    train = named(render("prod"), "RayJob", "mvit-train")
    # the driver needs a GPU node (it probes the local Decord build): exactly one on-demand group offers it
    assert [g["groupName"] for g in driver_groups(train)] == ["gpu-workers"]
    assert all(g in gpu_groups(train) for g in driver_groups(train))


def test_prod_gpu_workers_have_a_grace_period_and_drain_window_for_a_checkpoint() -> None:
    checked = 0
    for doc in filter(is_ray, render("prod")):
        assert not grace_problems(doc), (doc["metadata"]["name"], grace_problems(doc))
        checked += len(gpu_groups(doc))
        head_env = env_of(cluster_spec(doc)["headGroupSpec"]["template"]["spec"]["containers"][0])
        assert DRAIN_ENV not in head_env, "only the GPU workers' drain is widened (the head is never preempted)"
    assert checked == 3  # mvit-train: gpu-workers, gpu-spot-workers; mvit-interactive: gpu-workers


def _train() -> dict[str, Any]:
    return copy.deepcopy(named(render("prod"), "RayJob", "mvit-train"))


def _group(job: dict[str, Any], name: str) -> dict[str, Any]:
    return next(g for g in cluster_spec(job)["workerGroupSpecs"] if g["groupName"] == name)


def _spot_head(job: dict[str, Any]) -> None:
    del cluster_spec(job)["headGroupSpec"]["template"]["spec"]["affinity"]


def _spot_submitter(job: dict[str, Any]) -> None:
    affinity = job["spec"]["submitterPodTemplate"]["spec"]["affinity"]
    required = affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    required["nodeSelectorTerms"][0]["matchExpressions"].pop()  # the Karpenter label: its spot nodes admitted


def _driver_on_spot_group(job: dict[str, Any]) -> None:
    spot = _group(job, "gpu-spot-workers")
    spot["rayStartParams"]["resources"] = _group(job, "gpu-workers")["rayStartParams"]["resources"]


def _no_spot_gpus(job: dict[str, Any]) -> None:
    on_demand = _group(job, "gpu-workers")["template"]["spec"]["affinity"]
    _group(job, "gpu-spot-workers")["template"]["spec"]["affinity"] = copy.deepcopy(on_demand)


def _default_grace(job: dict[str, Any]) -> None:
    del _group(job, "gpu-spot-workers")["template"]["spec"]["terminationGracePeriodSeconds"]


def _default_drain(job: dict[str, Any]) -> None:
    container = _group(job, "gpu-workers")["template"]["spec"]["containers"][0]
    container["env"] = [e for e in container["env"] if e["name"] != DRAIN_ENV]


def _drain_outlasts_grace(job: dict[str, Any]) -> None:
    env = env_of(_group(job, "gpu-spot-workers")["template"]["spec"]["containers"][0])
    env[DRAIN_ENV]["value"] = "120"


def _no_retries(job: dict[str, Any]) -> None:
    job["spec"]["backoffLimit"] = 0


def _deadline(job: dict[str, Any]) -> None:
    job["spec"]["activeDeadlineSeconds"] = 86400


def _local_storage(job: dict[str, Any]) -> None:
    entrypoint = job["spec"]["entrypoint"]
    assert "trainer.storage_path=s3://mvit-data/runs" in entrypoint
    job["spec"]["entrypoint"] = entrypoint.replace("trainer.storage_path=s3://mvit-data/runs", "trainer.storage_path=runs")


def _per_attempt_name(job: dict[str, Any]) -> None:
    job["spec"]["entrypoint"] += " name=k400-$(date +%s)"


@pytest.mark.parametrize(
    ("breakage", "check"),
    [
        (_spot_head, spot_problems),
        (_spot_submitter, spot_problems),
        (_driver_on_spot_group, spot_problems),
        (_no_spot_gpus, spot_problems),
        (_default_grace, grace_problems),
        (_default_drain, grace_problems),
        (_drain_outlasts_grace, grace_problems),
        (_no_retries, retry_problems),
        (_deadline, retry_problems),
        (_local_storage, resume_problems),
        (_per_attempt_name, resume_problems),
    ],
    ids=lambda v: v.__name__.strip("_"),
)
def test_each_check_fails_on_a_manifest_that_breaks_its_rule(breakage: Any, check: Any) -> None:
    job = _train()
    assert not check(job), "the rendered prod job should pass before it is broken"
    breakage(job)
    assert check(job), f"{check.__name__} accepted a job with {breakage.__name__.strip('_')}"


def test_the_interactive_clusters_driver_group_is_checked_too() -> None:
    cluster = copy.deepcopy(named(render("prod"), "RayCluster", "mvit-interactive"))
    del _group(cluster, "gpu-workers")["template"]["spec"]["affinity"]
    assert spot_problems(cluster) == ["driver group gpu-workers may land on a spot node"]


@pytest.mark.parametrize("field", ["affinity", "terminationGracePeriodSeconds"])
def test_the_new_pod_fields_are_schema_checked(field: str) -> None:
    """The pod templates pass kubernetes-validate --strict (test_k8s_validation.py); it sees these fields."""
    pod = copy.deepcopy(_group(_train(), "gpu-spot-workers")["template"])
    if field == "affinity":
        pod["spec"]["affinity"]["nodeAffinity"]["preferredDuringScheduling"] = []
    else:
        pod["spec"]["terminationGracePeriodSeconds"] = "120"
    wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": pod}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrapped, KUBERNETES_VERSION, strict=True)
