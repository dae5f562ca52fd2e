"""The pods the rendered manifests create, with the labels they will carry, and the NetworkPolicy
semantics evaluated on them: which policies select a pod, and whether a connection is admitted.

Pods of Deployments, StatefulSets and Jobs carry their template's labels (a Job adds job-name). A Ray
node carries the labels KubeRay gives it (ray.io/cluster, ray.io/node-type, ...), which the template's
own labels override, except the cluster, node type and group (KubeRay's `labelPod`); a RayJob's cluster
is named `<RayJob>-<5 random characters>`, a new name per attempt, which `GENERATED_SUFFIX` stands for.
A RayJob's submitter pod carries its template's labels plus the RayJob's name in KubeRay's labels.

The evaluation follows the NetworkPolicy API: a pod selected by no policy of a direction is open in
that direction; otherwise a connection needs a rule of a selecting policy that admits the peer and
the port, and a connection between pods needs both the source's egress and the destination's ingress
(`connects`); who may reach a server is judged by its ingress alone (`admits`).
Pods get addresses in POD_CIDR and ipBlocks are matched against them too (some policy engines, Calico
among them, do; others ignore ipBlocks for pods), so an ipBlock that covers the pod range counts.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from k8s_manifests import is_ray, of_kind, ray_node_templates

GENERATED_SUFFIX = "q4z7m"
POD_CIDR = ipaddress.ip_network("10.244.0.0/16")
METADATA_ADDRESS = ipaddress.ip_address("169.254.169.254")
OPERATOR_NAMESPACE = "kuberay-system"


@dataclass(frozen=True)
class Pod:
    where: str  # "RayJob/mvit-train head", "Deployment/mlflow", ... (as k8s_manifests.pod_templates names them)
    namespace: str
    labels: Mapping[str, str]
    ip: ipaddress.IPv4Address
    template: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)


def _kuberay_node_labels(cluster: str, node_type: str, group: str, own: Mapping[str, str]) -> dict[str, str]:
    labels = {
        "ray.io/is-ray-node": "yes",
        "ray.io/identifier": f"{cluster}-{node_type}",
        "app.kubernetes.io/name": "kuberay",
        "app.kubernetes.io/created-by": "kuberay-operator",
    }
    labels.update(own)
    labels.update({"ray.io/cluster": cluster, "ray.io/node-type": node_type, "ray.io/group": group})
    return labels


def rendered_pods(docs: list[dict[str, Any]]) -> list[Pod]:
    """Every pod the resources of one rendered overlay create, one per template."""
    found: list[tuple[str, str, dict[str, str], Mapping[str, Any]]] = []
    for doc in docs:
        kind, name, namespace = doc["kind"], doc["metadata"]["name"], doc["metadata"].get("namespace", "")
        if is_ray(doc):
            cluster = name if kind == "RayCluster" else f"{name}-{GENERATED_SUFFIX}"
            for role, template, _ in ray_node_templates(doc):
                own = template.get("metadata", {}).get("labels", {})
                node_type, group = ("head", "headgroup") if role == "head" else ("worker", role.split(":", 1)[1])
                labels = _kuberay_node_labels(cluster, node_type, group, own)
                found.append((f"{kind}/{name} {role}", namespace, labels, template))
            submitter = doc["spec"].get("submitterPodTemplate")
            if kind == "RayJob" and submitter is not None:
                labels = {**submitter.get("metadata", {}).get("labels", {}), "job-name": name,
                          "ray.io/originated-from-cr-name": name, "ray.io/originated-from-crd": "RayJob",
                          "app.kubernetes.io/created-by": "kuberay-operator"}  # fmt: skip
                found.append((f"{kind}/{name} submitter", namespace, labels, submitter))
        elif kind in ("Deployment", "StatefulSet", "Job"):
            template = doc["spec"]["template"]
            labels = dict(template["metadata"].get("labels", {}))
            if kind == "Job":
                labels["job-name"] = name
            found.append((f"{kind}/{name}", namespace, labels, template))
    hosts = POD_CIDR.hosts()
    next(hosts)
    return [Pod(where, ns, labels, next(hosts), template) for where, ns, labels, template in found]


def outsider(where: str, namespace: str, labels: Mapping[str, str], index: int) -> Pod:
    """A pod the project does not run (a neighbour, the KubeRay operator, kube-dns), at an address of
    the pod range far from the rendered pods'."""
    return Pod(where, namespace, dict(labels), POD_CIDR.network_address + 60000 + index)


def neighbours(namespace: str) -> list[Pod]:
    """Hostile pods: one in the namespace, one elsewhere, and one elsewhere that copies the labels the
    policies admit (a podSelector alone means this namespace's pods, so it must not help)."""
    copied = {"mvit-ray-cluster": "mvit-train", "app.kubernetes.io/name": "mlflow", "mvit-s3-client": "true",
              "mvit-ray-submitter": "mvit-train", "ray.io/node-type": "head"}  # fmt: skip
    return [
        outsider("a neighbour pod in the namespace", namespace, {"app": "neighbour"}, 1),
        outsider("a pod of another namespace", "elsewhere", {"app": "neighbour"}, 2),
        outsider("a pod of another namespace with copied labels", "elsewhere", copied, 3),
    ]


def kuberay_operator() -> Pod:
    return outsider("the KubeRay operator", OPERATOR_NAMESPACE, {"app.kubernetes.io/name": "kuberay-operator"}, 10)


def kube_dns() -> Pod:
    return outsider("kube-dns", "kube-system", {"k8s-app": "kube-dns"}, 11)


# -- selectors and peers ----------------------------------------------------------------------------------


def selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """A LabelSelector: matchLabels and matchExpressions, all of them (an empty selector selects all)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        if operator == "In":
            ok = key in labels and labels[key] in values
        elif operator == "NotIn":
            ok = key not in labels or labels[key] not in values
        elif operator == "Exists":
            ok = key in labels
        elif operator == "DoesNotExist":
            ok = key not in labels
        else:
            raise AssertionError(f"unknown selector operator {operator!r}")
        if not ok:
            return False
    return True


def namespace_labels(namespace: str) -> dict[str, str]:
    return {"kubernetes.io/metadata.name": namespace}  # set by Kubernetes on every namespace


def _in_block(block: Mapping[str, Any], address: ipaddress.IPv4Address) -> bool:
    if address not in ipaddress.ip_network(block["cidr"]):
        return False
    return not any(address in ipaddress.ip_network(e) for e in block.get("except", []))


Peer = Pod | ipaddress.IPv4Address


def peer_matches(peer: Mapping[str, Any], policy_namespace: str, other: Peer) -> bool:
    if "ipBlock" in peer:
        return _in_block(peer["ipBlock"], other if isinstance(other, ipaddress.IPv4Address) else other.ip)
    if not isinstance(other, Pod):
        return False  # a pod or namespace selector names pods, never an outside address
    if "namespaceSelector" in peer:
        in_namespace = selects(peer["namespaceSelector"], namespace_labels(other.namespace))
    else:
        in_namespace = other.namespace == policy_namespace
    return in_namespace and selects(peer.get("podSelector", {}), other.labels)


def _port_matches(ports: list[Mapping[str, Any]] | None, port: int, protocol: str) -> bool:
    if not ports:
        return True
    for entry in ports:
        assert isinstance(entry.get("port", 0), int), f"named port {entry['port']!r}: use numbers"
        if entry.get("protocol", "TCP") != protocol:
            continue
        low = entry.get("port")
        if low is None or low <= port <= entry.get("endPort", low):
            return True
    return False


def policy_types(policy: Mapping[str, Any]) -> list[str]:
    spec = policy["spec"]
    return spec.get("policyTypes") or (["Ingress"] + (["Egress"] if "egress" in spec else []))


def selecting(policies: Iterable[Mapping[str, Any]], pod: Pod, direction: str) -> list[Mapping[str, Any]]:
    """The policies that select `pod` for `direction` ("Ingress" or "Egress")."""
    return [
        p for p in policies
        if p["metadata"].get("namespace", "") == pod.namespace
        and selects(p["spec"]["podSelector"], pod.labels) and direction in policy_types(p)
    ]  # fmt: skip


def _admitted(policies: list[Mapping[str, Any]], direction: str, other: Peer, port: int, protocol: str) -> bool:
    key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    for policy in policies:
        namespace = policy["metadata"].get("namespace", "")
        for rule in policy["spec"].get(key, []):
            peers = rule.get(peers_key)
            if (not peers or any(peer_matches(p, namespace, other) for p in peers)) and _port_matches(
                rule.get("ports"), port, protocol
            ):
                return True
    return False


def admits(policies: list[Mapping[str, Any]], src: Pod, dst: Pod, port: int, protocol: str = "TCP") -> bool:
    """Whether `dst`'s ingress admits a connection from `src`, whatever `src`'s own egress rules say:
    the question to ask of a server, since an attacker's pod need not be bound by this namespace's
    egress policies (it may sit in another namespace, or they may be changed)."""
    into = selecting(policies, dst, "Ingress")
    return not into or _admitted(into, "Ingress", src, port, protocol)


def connects(policies: list[Mapping[str, Any]], src: Pod, dst: Peer, port: int, protocol: str = "TCP") -> bool:
    """Whether `src` may open a connection to `dst` (a pod, or an address outside the cluster) on
    `port`: its egress and, for a pod, the destination's ingress."""
    out = selecting(policies, src, "Egress")
    if out and not _admitted(out, "Egress", dst, port, protocol):
        return False
    return isinstance(dst, ipaddress.IPv4Address) or admits(policies, src, dst, port, protocol)


def network_policies(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return of_kind(docs, "NetworkPolicy")
