"""What the manifests name must exist in this repository: the training entry point and its config
preset (parsed by the real CLI), the preprocessing commands (parsed by the real CLI), the images and
their Dockerfiles, the one image tag, the Ray version, the Secrets docs/deployment.md tells users to create."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
from typing import Any

import pytest
import yaml
from k8s_manifests import K8S, PROJECT_IMAGES, REPO, cluster_spec, containers, named, of_kind, pod_templates, render

IMAGES = K8S / "images"


def _overrides(tokens: list[str]) -> dict[str, str]:
    return dict(t.split("=", 1) for t in tokens)


def test_training_entrypoint_runs_the_train_script_on_a_preset_that_exists(
    docs: list[dict[str, Any]], overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.trainer.job import main

    tokens = shlex.split(named(docs, "RayJob", "mvit-train")["spec"]["entrypoint"])
    assert tokens[:3] == ["python", "pipeline/train.py", "--config"], tokens
    config = tokens[3]
    assert (REPO / "pipeline/train.py").is_file()
    assert re.fullmatch(r"configs/experiment/[a-z0-9_]+\.yaml", config), config
    assert (REPO / config).is_file(), f"{config} does not exist in the repository"
    overrides = _overrides(tokens[4:])
    assert overrides["data.root"].startswith("s3://") and overrides["trainer.storage_path"].startswith("s3://")
    # the real CLI resolves the preset with the overrides (unknown keys or bad values fail here)
    monkeypatch.chdir(REPO)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(tokens[2:] + ["--print-config"]) == 0
    resolved = yaml.safe_load(out.getvalue())
    assert resolved["data"]["root"] == overrides["data.root"]
    if overlay == "prod":
        assert resolved["trainer"]["use_gpu"] is True
        # the GPU groups together (prod: gpu-workers on demand, gpu-spot-workers) hold every trainer
        gpus = 0
        for group in cluster_spec(named(docs, "RayJob", "mvit-train"))["workerGroupSpecs"]:
            limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
            gpus += int(limits.get("nvidia.com/gpu", 0)) * group["maxReplicas"]
        needed = resolved["trainer"]["num_workers"] * resolved["trainer"]["gpus_per_worker"]
        assert needed <= gpus, "more GPU workers than the GPU groups can hold"
        # GPU decoder actors share each trainer's GPU
        assert resolved["trainer"]["gpus_per_worker"] + resolved["data"]["decoder"]["num_gpus"] <= 1.0
    else:
        assert resolved["trainer"]["use_gpu"] is False
        endpoint = named(docs, "ConfigMap", "mvit-env")["data"]["AWS_ENDPOINT_URL"]
        assert resolved["data"]["s3_endpoint_url"] == endpoint


def test_preprocessing_entrypoint_is_valid_preprocessing_cli(docs: list[dict[str, Any]], overlay: str) -> None:
    from preprocessing.cli import build_parser

    commands = named(docs, "RayJob", "mvit-preprocess")["spec"]["entrypoint"].split("&&")
    parsed = []
    for command in commands:
        tokens = shlex.split(command)
        assert tokens[:3] == ["python", "-m", "preprocessing"], tokens
        try:
            parsed.append(build_parser().parse_args(tokens[3:]))
        except SystemExit:
            pytest.fail(f"`{command.strip()}` is not valid `python -m preprocessing` usage")
    writes = [a for a in parsed if a.command in ("kinetics", "imagenet")]
    assert {a.split for a in writes} == {"train", "val"}
    assert all(a.out.startswith("s3://") for a in writes)
    assert parsed[-1].command == "verify" and set(parsed[-1].split) == {"train", "val"}
    if overlay == "prod":
        assert all(a.ray == "" for a in writes), "prod spreads shards over the Ray cluster (--ray)"
    train_root = _overrides(shlex.split(named(docs, "RayJob", "mvit-train")["spec"]["entrypoint"])[4:])["data.root"]
    assert {a.out for a in writes} == {train_root}, "training reads what preprocessing writes"


def test_jobs_ship_the_project_tree_that_the_images_contain(docs: list[dict[str, Any]]) -> None:
    for job in of_kind(docs, "RayJob"):
        working_dir = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["working_dir"]
        for dockerfile in ("Dockerfile.cpu", "Dockerfile.gpu"):
            text = (IMAGES / dockerfile).read_text()
            assert f"WORKDIR {working_dir}\n" in text, dockerfile
            for tree in ("pipeline", "preprocessing", "configs"):
                assert f"COPY --chown=ray:users {tree} ./{tree}" in text, (dockerfile, tree)


def test_s3_bucket_is_the_same_everywhere_in_an_overlay(docs: list[dict[str, Any]], overlay: str) -> None:
    buckets = set(re.findall(r"s3://([a-z0-9.-]+)", yaml.safe_dump_all(docs)))
    assert len(buckets) == 1, f"{overlay} uses several buckets: {sorted(buckets)}"
    if overlay == "dev":
        job = named(docs, "Job", "minio-create-bucket")
        bucket_env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert buckets == {bucket_env["BUCKET"]}, "the bucket job creates another bucket than the one used"


def _image_tag() -> str:
    text = (K8S / "base/kustomization.yaml").read_text()
    literals = re.findall(r"newTag:\s*&tag\s*\"?([^\"\s]+)\"?", text)
    assert len(literals) == 1, "the tag must be written once, as `newTag: &tag VALUE`"
    return literals[0]


def test_the_image_tag_is_set_in_one_place(docs: list[dict[str, Any]], overlay: str) -> None:
    tag = _image_tag()
    base = yaml.safe_load((K8S / "base/kustomization.yaml").read_text())
    assert {i["name"]: i["newTag"] for i in base["images"]} == dict.fromkeys(PROJECT_IMAGES, tag)
    for path in K8S.rglob("*.yaml"):
        text = path.read_text()
        if path != K8S / "base/kustomization.yaml":
            assert "newTag" not in text, f"{path}: only k8s/base/kustomization.yaml sets the tag"
        assert not re.search(r"image:\s*\S*mvit-(cpu|gpu|mlflow):", text), f"{path}: tagged project image"
    rendered = {c["image"] for d in docs for _, t in pod_templates(d) for c in containers(t)}
    ours = {i for i in rendered if re.search(r"(^|/)mvit-(cpu|gpu|mlflow):", i)}
    assert ours and all(i.endswith(f":{tag}") for i in ours), ours
    if overlay == "prod":
        assert all("/" in i.split(":")[0] for i in ours), "prod pulls the project images from a registry"


def test_build_script_builds_every_image_with_that_tag() -> None:
    result = subprocess.run(
        ["bash", str(IMAGES / "build.sh"), "--registry", "registry.test/mvit", "--push"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "DOCKER": "echo"}, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    tag = _image_tag()
    for image in PROJECT_IMAGES:
        name = image.removeprefix("mvit-")
        builds = [line for line in result.stdout.splitlines() if f" -f k8s/images/Dockerfile.{name} " in line]
        assert len(builds) == 1 and builds[0].startswith("build ")
        assert f" -t registry.test/mvit/{image}:{tag} " in builds[0]
        if name in ("cpu", "gpu"):
            assert "--build-arg GIT_COMMIT=" in builds[0], "the images record the commit for MLflow"
        assert f"push registry.test/mvit/{image}:{tag}" in result.stdout


def test_build_script_loads_the_dev_images_into_a_local_cluster_under_that_tag() -> None:
    """docs/deployment.md's dev step never spells the tag: build.sh loads what it built into kind/minikube."""
    env = {**os.environ, "DOCKER": "echo", "KIND": "echo kind", "MINIKUBE": "echo minikube"}
    run = lambda *args: subprocess.run(["bash", str(IMAGES / "build.sh"), *args], capture_output=True, text=True,
                                       timeout=60, env=env, cwd=REPO)
    tag = _image_tag()
    kind = run("--only", "cpu,mlflow", "--load", "kind")
    assert kind.returncode == 0, kind.stderr
    loads = [line for line in kind.stdout.splitlines() if line.startswith("kind load")]
    assert loads == [f"kind load docker-image mvit-cpu:{tag}", f"kind load docker-image mvit-mlflow:{tag}"]
    minikube = run("--only", "cpu", "--load", "minikube")
    assert f"minikube image load mvit-cpu:{tag}" in minikube.stdout
    bad = run("--load", "docker-desktop")
    assert bad.returncode == 2 and "--load takes kind or minikube" in bad.stderr


def _dockerfile_arg(dockerfile: str, name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", (IMAGES / dockerfile).read_text(), re.MULTILINE)
    assert match, f"{dockerfile} has no ARG {name}=..."
    return match.group(1).strip('"')


def test_every_rendered_project_image_has_a_dockerfile_on_the_ray_version_in_use(docs: list[dict[str, Any]]) -> None:
    rendered = {c["image"].rsplit("/", 1)[-1].split(":")[0] for d in docs for _, t in pod_templates(d) for c in containers(t)}
    for image in rendered & set(PROJECT_IMAGES):
        assert (IMAGES / f"Dockerfile.{image.removeprefix('mvit-')}").is_file(), image
    ray_versions = {cluster_spec(d)["rayVersion"] for d in docs if d["apiVersion"].startswith("ray.io/")}
    for dockerfile in ("Dockerfile.cpu", "Dockerfile.gpu"):
        assert ray_versions == {_dockerfile_arg(dockerfile, "RAY_VERSION")}, dockerfile
        text = (IMAGES / dockerfile).read_text()
        assert "FROM rayproject/ray:${RAY_VERSION}-py311-" in text
        assert '"ray[default,train,data]==${RAY_VERSION}"' in text, "pip must keep Ray at the image's version"


def test_gpu_image_builds_decord_with_nvdec() -> None:
    text = (IMAGES / "Dockerfile.gpu").read_text()
    assert "git clone" in text and "https://github.com/dmlc/decord" in text
    assert "-DUSE_CUDA=ON" in text
    assert re.search(r"NVIDIA_DRIVER_CAPABILITIES=\S*video", text), "NVDEC needs the `video` driver capability"
    assert "grep -q libnvcuvid" in text, "the build must fail when NVDEC is not linked"
    assert "pip uninstall -y decord" in text, "the CPU-only PyPI wheel must be replaced"
    assert _dockerfile_arg("Dockerfile.gpu", "CUDA_DEVEL_IMAGE").startswith("nvidia/cuda:")


def test_mlflow_image_has_the_postgres_and_s3_clients() -> None:
    text = (IMAGES / "Dockerfile.mlflow").read_text()
    assert "psycopg2" in text and "boto3" in text and '"mlflow[auth]==${MLFLOW_VERSION}"' in text
    assert re.search(r"^USER 1000", text, re.MULTILINE)


def _deployment_page() -> str:
    """The whole of docs/deployment.md (the page that tells users how to deploy)."""
    page = REPO / "docs" / "deployment.md"
    assert page.is_file(), "docs/deployment.md is missing"
    return page.read_text()


def test_deployment_page_creates_every_secret_the_manifests_use() -> None:
    wanted: set[tuple[str, str]] = set()
    for overlay in ("dev", "prod"):
        for doc in render(overlay):
            if doc["apiVersion"].startswith("ray.io/") and "authOptions" in cluster_spec(doc):
                wanted.add((cluster_spec(doc)["authOptions"]["secretName"], "auth_token"))
            for _, template in pod_templates(doc):
                for container in containers(template):
                    for entry in container.get("env", []):
                        ref = entry.get("valueFrom", {}).get("secretKeyRef")
                        if ref:
                            wanted.add((ref["name"], ref["key"]))
    section = _deployment_page()
    commands = re.findall(r"kubectl create secret generic (\S+)((?:[^\n]*\\\n)*[^\n]*)", section)
    created = {(name, key) for name, rest in commands for key in re.findall(r"--from-literal=([a-z_]+)=", rest)}
    assert wanted <= created, f"docs/deployment.md does not create: {sorted(wanted - created)}"


def test_deployment_page_uses_the_real_names() -> None:
    section = _deployment_page()
    for text in ("k8s/overlays/dev", "k8s/overlays/prod", "k8s/images/build.sh", "mvit-stage=platform",
                 "mvit-interactive-head-svc", "svc/mlflow", "ray job submit", "RAY_AUTH_TOKEN",
                 "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "job/mlflow-create-user",
                 "k8s/iam/preprocess.json", "k8s/iam/train.json", "k8s/iam/mlflow.json", "default-deny",
                 "169.254.169.254", "automountServiceAccountToken"):
        assert text in section, text
    for stage in ("platform", "preprocess", "train", "interactive"):
        assert f"-l mvit-stage={stage}" in section, stage
