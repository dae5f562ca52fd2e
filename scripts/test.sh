#!/usr/bin/env bash
# Installs the project with its test dependencies into .venv and runs the whole test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -m "not slow" tests/models
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh dev
exec .venv/bin/python -m pytest "$@"
