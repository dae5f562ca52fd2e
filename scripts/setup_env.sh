#!/usr/bin/env bash
# Creates (or reuses) the project's virtualenv in .venv and installs the project into it.
# Usage: scripts/setup_env.sh [EXTRAS]   e.g. scripts/setup_env.sh dev
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
spec="."
if [ -n "${1:-}" ]; then spec=".[${1}]"; fi
.venv/bin/python -m pip install --quiet -e "$spec"
