"""A deployment that assumes a hostile neighbour (issue 13, point 7), checked on the rendered overlays:
each NetworkPolicy selects exactly the pods it is written for, the policies together admit only the
paths the system needs (evaluated for every pair of rendered pods and for pods the project does not
run: a neighbour in the namespace, pods of another namespace, the KubeRay operator), no pod reaches the
cloud metadata address, and no pod holds a Kubernetes API token but the Ray heads' autoscaler."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from k8s_manifests import (
    MLFLOW_CLIENT_CLUSTERS,
    assert_check_catches,
    cluster_spec,
    containers,
    is_ray,
    of_kind,
    pod_templates,
)
from k8s_network import (
    METADATA_ADDRESS,
    Pod,
    admits,
    connects,
    kube_dns,
    kuberay_operator,
    network_policies,
    neighbours,
    rendered_pods,
    selecting,
    selects,
)

RAY_CLUSTERS = {"mvit-train": "RayJob", "mvit-preprocess": "RayJob", "mvit-interactive": "RayCluster"}
HEAD_PORTS = (6379, 8265, 10001, 8080)  # GCS, dashboard, client, metrics (the head container's ports)
# ports Ray nodes listen on besides those: raylet/object manager (random), dashboard agent, worker range
NODE_PORTS = (*HEAD_PORTS, 52365, 10002, 19999, 40000)
S3_ADDRESS = ipaddress.ip_address("52.216.8.40")  # a public address, as S3's are
PUBLIC_PORTS = (443, 80, 53, 8080)


def _namespace(docs: list[dict[str, Any]]) -> str:
    return of_kind(docs, "Namespace")[0]["metadata"]["name"]


def _everyone(docs: list[dict[str, Any]]) -> list[Pod]:
    """The rendered pods and the ones the project does not run."""
    return rendered_pods(docs) + neighbours(_namespace(docs)) + [kuberay_operator(), kube_dns()]


def _cluster_of(pod: Pod) -> str | None:
    """The Ray cluster a rendered pod is a node of (head or worker), None for any other pod."""
    for name, kind in RAY_CLUSTERS.items():
        if pod.where.startswith(f"{kind}/{name} ") and not pod.where.endswith(" submitter"):
            return name
    return None


def _by_where(pods: list[Pod], where: str) -> Pod:
    return next(p for p in pods if p.where == where)


def _expected_selections(pods: list[Pod], overlay: str) -> dict[str, set[str]]:
    everything = {p.where for p in pods}
    nodes = {c: {p.where for p in pods if _cluster_of(p) == c} for c in RAY_CLUSTERS}
    heads = {f"{kind}/{c} head" for c, kind in RAY_CLUSTERS.items()}
    expected = {
        "default-deny": everything,
        "dns-egress": everything,
        "s3-egress": set().union(*nodes.values()) | {"Deployment/mlflow"},
        "mlflow": {"Deployment/mlflow"},
        "postgres": {"StatefulSet/postgres"},
        "mlflow-create-user": {"Job/mlflow-create-user"},
        "ray-head-kuberay-operator": heads,
        "ray-autoscaler-apiserver": heads,
        "ray-mvit-interactive": nodes["mvit-interactive"],
    }
    for job in ("mvit-train", "mvit-preprocess"):
        expected[f"ray-{job}"] = nodes[job]
        expected[f"ray-{job}-head"] = {f"RayJob/{job} head"}
        expected[f"ray-{job}-submitter"] = {f"RayJob/{job} submitter"}
    if overlay == "dev":
        expected |= {"minio": {"Deployment/minio"}, "minio-create-bucket": {"Job/minio-create-bucket"}}
    return expected


def test_each_network_policy_selects_exactly_its_pods(docs: list[dict[str, Any]], overlay: str) -> None:
    pods = rendered_pods(docs)
    assert all(len(nodes) >= 2 for nodes in ({p.where for p in pods if _cluster_of(p) == c} for c in RAY_CLUSTERS))
    expected = _expected_selections(pods, overlay)
    policies = {p["metadata"]["name"]: p for p in network_policies(docs)}
    assert set(policies) == set(expected), ("unexpected", set(policies) - set(expected), "missing", set(expected) - set(policies))
    for name, policy in policies.items():
        selected = {p.where for p in pods if selects(policy["spec"]["podSelector"], p.labels)}
        assert selected == expected[name], (name, sorted(selected ^ expected[name]))


def test_the_policies_address_ray_pods_by_labels_their_templates_set(docs: list[dict[str, Any]]) -> None:
    """A RayJob's cluster name is generated, so no policy may select on ray.io/cluster (it would match
    nothing); every Ray node carries mvit-ray-cluster, every submitter mvit-ray-submitter."""
    for policy in network_policies(docs):
        assert "ray.io/cluster" not in str(policy["spec"]), policy["metadata"]["name"]
    for doc in filter(is_ray, docs):
        name = doc["metadata"]["name"]
        for where, template in pod_templates(doc):
            labels = template.get("metadata", {}).get("labels", {})
            key = "mvit-ray-submitter" if where.endswith(" submitter") else "mvit-ray-cluster"
            assert labels.get(key) == name, where


# -- the checks: each returns its problems, so the last test can show it fails on a broken manifest -------


def _admitted_to(docs: list[dict[str, Any]], target: Pod, port: int) -> set[str]:
    """Who `target`'s ingress admits on `port`, whatever the sources' own egress rules say."""
    policies = network_policies(docs)
    return {src.where for src in _everyone(docs) if src.where != target.where and admits(policies, src, target, port)}


def head_port_problems(docs: list[dict[str, Any]]) -> list[str]:
    problems = []
    everyone = _everyone(docs)
    for cluster, kind in RAY_CLUSTERS.items():
        head = _by_where(everyone, f"{kind}/{cluster} head")
        ports = {p["containerPort"] for p in head.template["spec"]["containers"][0]["ports"]}
        if ports != set(HEAD_PORTS):
            problems.append(f"{head.where} listens on {sorted(ports)}, the checks probe {HEAD_PORTS}")
        for port in HEAD_PORTS:
            wanted = {p.where for p in everyone if _cluster_of(p) == cluster and p.where != head.where}
            if port == 8265:
                wanted.add(kuberay_operator().where)
                if kind == "RayJob":
                    wanted.add(f"RayJob/{cluster} submitter")
            admitted = _admitted_to(docs, head, port)
            problems += [f"{w} reaches {head.where}:{port}" for w in sorted(admitted - wanted)]
            problems += [f"{w} cannot reach {head.where}:{port}" for w in sorted(wanted - admitted)]
    return problems


def worker_problems(docs: list[dict[str, Any]]) -> list[str]:
    problems = []
    everyone = _everyone(docs)
    workers = [p for p in everyone if _cluster_of(p) and " worker:" in p.where]
    for worker in workers:
        wanted = {p.where for p in everyone if _cluster_of(p) == _cluster_of(worker) and p.where != worker.where}
        for port in NODE_PORTS:
            admitted = _admitted_to(docs, worker, port)
            problems += [f"{w} reaches {worker.where}:{port}" for w in sorted(admitted - wanted)]
            problems += [f"{w} cannot reach {worker.where}:{port}" for w in sorted(wanted - admitted)]
    return problems


def mlflow_reach_problems(docs: list[dict[str, Any]]) -> list[str]:
    mlflow = _by_where(_everyone(docs), "Deployment/mlflow")
    wanted = {p.where for p in _everyone(docs) if _cluster_of(p) in MLFLOW_CLIENT_CLUSTERS} | {"Job/mlflow-create-user"}
    admitted = _admitted_to(docs, mlflow, 5000)
    problems = [f"{w} reaches MLflow" for w in sorted(admitted - wanted)]
    problems += [f"{w} cannot reach MLflow" for w in sorted(wanted - admitted)]
    for port in (5432, 8080, 443):
        problems += [f"{w} reaches MLflow on {port}" for w in sorted(_admitted_to(docs, mlflow, port))]
    return problems


def metadata_problems(docs: list[dict[str, Any]]) -> list[str]:
    problems = []
    policies = network_policies(docs)
    for policy in policies:
        name = policy["metadata"]["name"]
        for rule in policy["spec"].get("egress", []):
            if not rule.get("to"):
                problems.append(f"{name}: an egress rule without `to` admits every address")
            for peer in rule.get("to", []):
                block = peer.get("ipBlock")
                if block and METADATA_ADDRESS in ipaddress.ip_network(block["cidr"]):
                    if not any(METADATA_ADDRESS in ipaddress.ip_network(e) for e in block.get("except", [])):
                        problems.append(f"{name}: {block['cidr']} admits {METADATA_ADDRESS}")
    for pod in rendered_pods(docs):
        if not selecting(policies, pod, "Egress"):
            problems.append(f"{pod.where}: no policy restricts its egress")
        for port, protocol in ((80, "TCP"), (443, "TCP"), (8775, "TCP"), (53, "UDP")):
            if connects(policies, pod, METADATA_ADDRESS, port, protocol):
                problems.append(f"{pod.where} reaches {METADATA_ADDRESS}:{port}/{protocol}")
    return problems


def _token_volumes(template: dict[str, Any]) -> set[str]:
    return {
        v["name"]
        for v in template["spec"].get("volumes", [])
        if any("serviceAccountToken" in s for s in v.get("projected", {}).get("sources", []))
    }


def _head_token_problems(doc: dict[str, Any], spec: dict[str, Any], tokens: set[str], accounts: dict[str, Any]) -> list[str]:
    where = f"{doc['kind']}/{doc['metadata']['name']} head"
    account = accounts.get(spec.get("serviceAccountName", ""))
    if account is None or spec["serviceAccountName"] != f"{doc['metadata']['name']}-autoscaler":
        return [f"{where}: not under its own ServiceAccount ({spec.get('serviceAccountName')})"]
    problems = []
    if account.get("automountServiceAccountToken") is not False:
        problems.append(f"ServiceAccount {spec['serviceAccountName']} lets pods automount its token")
    if account["metadata"]["labels"]["mvit-stage"] != doc["metadata"]["labels"]["mvit-stage"]:
        problems.append(f"ServiceAccount {spec['serviceAccountName']} is not applied with its stage")
    mounts = {m["name"]: m for m in cluster_spec(doc)["autoscalerOptions"].get("volumeMounts", [])}
    token_mounts = [mounts[name] for name in tokens if name in mounts]
    if len(tokens) != 1 or len(token_mounts) != 1:
        problems.append(f"{where}: the autoscaler needs exactly one token volume, found {sorted(tokens)}")
    elif token_mounts[0]["mountPath"] != "/var/run/secrets/kubernetes.io/serviceaccount" or not token_mounts[0].get("readOnly"):
        problems.append(f"{where}: the autoscaler's token is not where the autoscaler reads it, read-only")
    return problems


def token_problems(docs: list[dict[str, Any]]) -> list[str]:
    problems = []
    accounts = {a["metadata"]["name"]: a for a in of_kind(docs, "ServiceAccount")}
    for doc in docs:
        for where, template in pod_templates(doc):
            spec, tokens = template["spec"], _token_volumes(template)
            if spec.get("automountServiceAccountToken") is not False:
                problems.append(f"{where}: the service-account token is automounted")
            for container in containers(template):
                if {m["name"] for m in container.get("volumeMounts", [])} & tokens:
                    problems.append(f"{where} {container['name']}: mounts an API token")
            if where.endswith(" head") and is_ray(doc):
                problems += _head_token_problems(doc, spec, tokens, accounts)
            elif tokens or "serviceAccountName" in spec:
                problems.append(f"{where}: a service account or token it has no use for")
    if set(accounts) != {f"{name}-autoscaler" for name in RAY_CLUSTERS}:
        problems.append(f"ServiceAccounts: {sorted(accounts)}")
    # the autoscaler's rights are the Role KubeRay creates beside each cluster; the project grants none
    for kind in ("Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"):
        problems += [f"a {kind} in the manifests"] if of_kind(docs, kind) else []
    return problems


# -- the reliability cases ------------------------------------------------------------------------------


@pytest.mark.reliability
def test_ray_head_ports_admit_only_their_cluster_its_submitter_and_the_operator(docs: list[dict[str, Any]]) -> None:
    """No pod but a Ray cluster's own nodes reaches its head's GCS, client or metrics port; its dashboard adds its submitter and the KubeRay operator."""
    assert not head_port_problems(docs), head_port_problems(docs)


@pytest.mark.reliability
def test_ray_workers_are_reachable_only_from_their_own_cluster(docs: list[dict[str, Any]]) -> None:
    """No pod outside a Ray cluster (another Ray cluster's, a neighbour's, the operator) reaches any port of its workers."""
    assert not worker_problems(docs), worker_problems(docs)


@pytest.mark.reliability
def test_mlflow_is_reachable_only_from_the_pods_that_log_to_it(docs: list[dict[str, Any]]) -> None:
    """MLflow's port admits only the Ray nodes of mvit-train and mvit-interactive and the Job that creates its user; no neighbour, no other pod."""
    assert not mlflow_reach_problems(docs), mlflow_reach_problems(docs)


@pytest.mark.reliability
def test_no_egress_rule_admits_the_cloud_metadata_address(docs: list[dict[str, Any]]) -> None:
    """No egress rule of any pod admits the cloud metadata address 169.254.169.254, and every pod's egress is restricted."""
    assert not metadata_problems(docs), metadata_problems(docs)


@pytest.mark.reliability
def test_no_pod_holds_a_kubernetes_api_token_but_the_autoscaler(docs: list[dict[str, Any]]) -> None:
    """No pod mounts a Kubernetes API token, except each Ray head's autoscaler container, under a ServiceAccount of its own."""
    assert not token_problems(docs), token_problems(docs)


def test_postgres_and_minio_are_reachable_only_from_their_clients(docs: list[dict[str, Any]], overlay: str) -> None:
    policies, everyone = network_policies(docs), _everyone(docs)
    servers = {("StatefulSet/postgres", 5432): {"Deployment/mlflow"}}
    if overlay == "dev":
        s3_clients = {p.where for p in everyone if p.labels.get("mvit-s3-client") == "true" and p.namespace == _namespace(docs)}
        servers[("Deployment/minio", 9000)] = {*s3_clients, "Job/minio-create-bucket"}
        servers[("Deployment/minio", 9001)] = set()  # the console: port-forward only
    for (where, port), wanted in servers.items():
        server = _by_where(everyone, where)
        admitted = {s.where for s in everyone if s is not server and admits(policies, s, server, port)}
        assert admitted == wanted, (where, port, sorted(admitted ^ wanted))


def test_submitters_and_the_platform_reach_only_what_they_use(docs: list[dict[str, Any]], overlay: str) -> None:
    """Egress between the namespace's pods: each rendered pod reaches exactly the pods and ports it talks to."""
    policies, pods = network_policies(docs), rendered_pods(docs)
    probe_ports = sorted({5000, 5432, 9000, 9001, *NODE_PORTS})
    for src in pods:
        reached = {
            (dst.where, port) for dst in pods if dst is not src for port in probe_ports if connects(policies, src, dst, port)
        }
        cluster = _cluster_of(src)
        if cluster:
            wanted = {(d.where, port) for d in pods if _cluster_of(d) == cluster and d is not src for port in probe_ports}
            if cluster in MLFLOW_CLIENT_CLUSTERS:
                wanted.add(("Deployment/mlflow", 5000))
        elif src.where.endswith(" submitter"):
            wanted = {(src.where.replace(" submitter", " head"), 8265)}
        else:
            wanted = {
                "Deployment/mlflow": {("StatefulSet/postgres", 5432)},
                "Job/mlflow-create-user": {("Deployment/mlflow", 5000)},
                "Job/minio-create-bucket": {("Deployment/minio", 9000)},
            }.get(src.where, set())
        if overlay == "dev" and src.labels.get("mvit-s3-client") == "true":
            wanted.add(("Deployment/minio", 9000))
        assert reached == wanted, (src.where, sorted(reached ^ wanted))


def test_only_s3_clients_reach_outside_the_cluster_and_only_over_https(docs: list[dict[str, Any]], overlay: str) -> None:
    policies = network_policies(docs)
    for pod in rendered_pods(docs):
        reached = {port for port in PUBLIC_PORTS if connects(policies, pod, S3_ADDRESS, port)}
        s3_client = pod.labels.get("mvit-s3-client") == "true"
        assert reached == ({443} if s3_client and overlay == "prod" else set()), (pod.where, reached)
        assert connects(policies, pod, kube_dns(), 53, "UDP") and connects(policies, pod, kube_dns(), 53), pod.where
        for private in ("10.0.0.10", "172.20.0.5", "192.168.1.1"):  # the VPC, nodes, other clusters' services
            reaches = connects(policies, pod, ipaddress.ip_address(private), 443)
            assert not reaches or pod.where.endswith(" head"), (pod.where, private)  # heads: the API server


def test_only_ray_heads_reach_the_kubernetes_api(docs: list[dict[str, Any]], overlay: str) -> None:
    """The autoscaler sidecar reads and patches its RayCluster; nothing else talks to the API server."""
    policies = network_policies(docs)
    api_server = ipaddress.ip_address("172.18.0.2" if overlay == "dev" else "10.0.12.34")
    port = 6443 if overlay == "dev" else 443
    for pod in rendered_pods(docs):
        is_head = pod.where.endswith(" head") and _cluster_of(pod) is not None
        assert connects(policies, pod, api_server, port) == is_head, pod.where




# -- each check fails on a manifest that breaks its rule ------------------------------------------------


def _policy(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(p for p in network_policies(docs) if p["metadata"]["name"] == name)


def _head_template(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    doc = next(d for d in docs if is_ray(d) and d["metadata"]["name"] == name)
    return cluster_spec(doc)["headGroupSpec"]["template"]


def _head_open_to_the_namespace(docs: list[dict[str, Any]]) -> None:
    _policy(docs, "ray-mvit-train-head")["spec"]["ingress"].append({"from": [{"podSelector": {}}]})


def _gcs_open_to_the_submitter(docs: list[dict[str, Any]]) -> None:
    _policy(docs, "ray-mvit-preprocess-head")["spec"]["ingress"][0]["ports"].append({"port": 6379, "protocol": "TCP"})


def _clusters_share_workers(docs: list[dict[str, Any]]) -> None:
    peer = _policy(docs, "ray-mvit-interactive")["spec"]["ingress"][0]["from"][0]
    peer["podSelector"] = {"matchExpressions": [{"key": "mvit-ray-cluster", "operator": "Exists"}]}


def _any_namespace_to_workers(docs: list[dict[str, Any]]) -> None:
    peer = _policy(docs, "ray-mvit-train")["spec"]["ingress"][0]["from"][0]
    peer["namespaceSelector"] = {}


def _mlflow_open_to_the_namespace(docs: list[dict[str, Any]]) -> None:
    _policy(docs, "mlflow")["spec"]["ingress"][0]["from"].append({"podSelector": {}})


def _preprocessing_logs_to_mlflow(docs: list[dict[str, Any]]) -> None:
    clients = _policy(docs, "mlflow")["spec"]["ingress"][0]["from"][0]["podSelector"]["matchExpressions"][0]
    clients["values"].append("mvit-preprocess")


def _metadata_not_excepted(docs: list[dict[str, Any]]) -> None:
    block = _policy(docs, "s3-egress")["spec"]["egress"][0]["to"][0]["ipBlock"]
    block["cidr"], block["except"] = "0.0.0.0/0", ["10.0.0.0/8"]


def _egress_anywhere(docs: list[dict[str, Any]]) -> None:
    _policy(docs, "ray-mvit-train")["spec"]["egress"].append({"ports": [{"port": 80, "protocol": "TCP"}]})


def _metadata_by_dns_rule(docs: list[dict[str, Any]]) -> None:
    _policy(docs, "dns-egress")["spec"]["egress"][0]["to"].append({"ipBlock": {"cidr": "169.254.0.0/16"}})


def _unrestricted_egress(docs: list[dict[str, Any]]) -> None:
    for name in ("default-deny", "dns-egress", "postgres"):
        docs.remove(_policy(docs, name))


def _head_automounts(docs: list[dict[str, Any]]) -> None:
    _head_template(docs, "mvit-train")["spec"]["automountServiceAccountToken"] = True


def _ray_container_mounts_the_token(docs: list[dict[str, Any]]) -> None:
    container = _head_template(docs, "mvit-interactive")["spec"]["containers"][0]
    container["volumeMounts"].append({"name": "kube-api-access", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"})


def _shared_default_account(docs: list[dict[str, Any]]) -> None:
    del _head_template(docs, "mvit-preprocess")["spec"]["serviceAccountName"]


def _a_role_of_our_own(docs: list[dict[str, Any]]) -> None:
    docs.append({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "extra"}, "rules": []})


@pytest.mark.parametrize(
    ("breakage", "check"),
    [
        (_head_open_to_the_namespace, head_port_problems),
        (_gcs_open_to_the_submitter, head_port_problems),
        (_clusters_share_workers, worker_problems),
        (_any_namespace_to_workers, worker_problems),
        (_mlflow_open_to_the_namespace, mlflow_reach_problems),
        (_preprocessing_logs_to_mlflow, mlflow_reach_problems),
        (_metadata_not_excepted, metadata_problems),
        (_egress_anywhere, metadata_problems),
        (_metadata_by_dns_rule, metadata_problems),
        (_unrestricted_egress, metadata_problems),
        (_head_automounts, token_problems),
        (_ray_container_mounts_the_token, token_problems),
        (_shared_default_account, token_problems),
        (_a_role_of_our_own, token_problems),
    ],
    ids=lambda v: v.__name__.strip("_"),
)
def test_each_isolation_check_fails_on_a_manifest_that_breaks_its_rule(breakage: Any, check: Any) -> None:
    assert_check_catches(breakage, check)
