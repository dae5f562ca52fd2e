#!/usr/bin/env bash
# Creates (or reuses) the project's virtualenv in .venv and installs the project into it (editable).
# Usage: scripts/setup_env.sh [EXTRAS]   e.g. scripts/setup_env.sh dev
# A rerun with the same pyproject.toml and extras skips pip: the editable install already serves the
# current code, and only pyproject.toml (dependencies, console scripts) changes what pip would do.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
spec="."
if [ -n "${1:-}" ]; then spec=".[${1}]"; fi
hash="$(sha256sum pyproject.toml | cut -c1-16)"
stamp=".venv/.mvit-install-${hash}-${1:-base}"
# the same extras installed, or (for a plain install) any extras: they include the base
if [ -f "$stamp" ] || { [ -z "${1:-}" ] && compgen -G ".venv/.mvit-install-${hash}-*" >/dev/null; }; then
    exit 0
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# pip byte-compiles what it installs (about 75 CPU-seconds): keep it. With PYTHONDONTWRITEBYTECODE set, as
# on the CI machines, Python writes no .pyc at import, so without pip's every process of every test would
# compile each module it imports again (tried: the suite ran far slower).
.venv/bin/python -m pip install --quiet -e "$spec"
rm -f .venv/.mvit-install-*
touch "$stamp"
