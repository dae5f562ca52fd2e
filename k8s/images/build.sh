#!/usr/bin/env bash
# Builds the project's images with the tag set in k8s/base/kustomization.yaml (the one place it is set).
#
#   k8s/images/build.sh                          # mvit-cpu, mvit-gpu, mvit-mlflow as local images
#   k8s/images/build.sh --only cpu,mlflow        # a subset (the dev overlay needs no GPU image)
#   k8s/images/build.sh --registry REG --push    # REG/mvit-*:TAG, pushed (set REG in overlays/prod)
#   k8s/images/build.sh --only cpu,mlflow --load kind      # then loaded into a local kind cluster
#   k8s/images/build.sh --only cpu,mlflow --load minikube  # or into minikube
#
# Needs Docker with BuildKit (for the per-Dockerfile .dockerignore files). DOCKER=echo prints the
# commands instead of running them.
set -euo pipefail
cd "$(dirname "$0")/../.."

DOCKER="${DOCKER:-docker}"
registry=""
push=0
only="cpu,gpu,mlflow"
load=""
while [ $# -gt 0 ]; do
    case "$1" in
        --registry) registry="${2:?--registry needs a value}"; shift 2 ;;
        --push) push=1; shift ;;
        --only) only="${2:?--only needs a value}"; shift 2 ;;
        --load) load="${2:?--load needs kind or minikube}"; shift 2 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$load" in
    ""|kind|minikube) ;;
    *) echo "--load takes kind or minikube, not: $load" >&2; exit 2 ;;
esac

kustomization=k8s/base/kustomization.yaml
tags="$(sed -n 's/^[[:space:]]*newTag:[[:space:]]*&tag[[:space:]]*"\{0,1\}\([^"[:space:]]*\)"\{0,1\}.*$/\1/p' "$kustomization")"
if [ "$(printf '%s\n' "$tags" | grep -c .)" -ne 1 ]; then
    echo "expected exactly one 'newTag: &tag VALUE' in $kustomization, found: ${tags:-none}" >&2
    exit 1
fi
tag="$tags"
# recorded in the cpu/gpu images as MVIT_GIT_COMMIT (the MLflow tag git_commit of every run)
commit="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
if [ "$commit" != unknown ] && ! git diff --quiet HEAD -- pipeline preprocessing configs pyproject.toml; then
    commit="$commit-dirty"
fi

for name in ${only//,/ }; do
    build_args=()
    case "$name" in
        cpu|gpu) context=. ; build_args=(--build-arg "GIT_COMMIT=$commit") ;;
        mlflow) context=k8s/images ;;
        *) echo "unknown image: $name (cpu, gpu, mlflow)" >&2; exit 2 ;;
    esac
    image="${registry:+$registry/}mvit-$name:$tag"
    DOCKER_BUILDKIT=1 $DOCKER build -f "k8s/images/Dockerfile.$name" ${build_args[@]+"${build_args[@]}"} -t "$image" "$context"
    if [ "$push" = 1 ]; then
        $DOCKER push "$image"
    fi
    # the local cluster cannot pull a local image: copy it in, under the same name and tag
    case "$load" in
        kind) ${KIND:-kind} load docker-image "$image" ;;
        minikube) ${MINIKUBE:-minikube} image load "$image" ;;
    esac
done
