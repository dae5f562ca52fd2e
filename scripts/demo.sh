#!/usr/bin/env bash
# The main job on the embedded default (everything local). Installs the project into .venv first.
# Today it checks the model family end to end on CPU: the preset table from the project's own
# FLOP/parameter counter next to the paper, then one training step of MViT-B at a small input size.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
.venv/bin/python -m pipeline.models table
.venv/bin/python -m pipeline.models smoke --preset mvit_b_16x4 --frames 8 --crop 112
.venv/bin/python -m pipeline.models smoke --preset mvitv2_s_16x4 --frames 8 --crop 112
