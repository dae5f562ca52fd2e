#!/usr/bin/env bash
# The main job on the embedded default: local Ray (token auth, loopback), local files, local MLflow.
#   1. installs the project into .venv
#   2. writes a synthetic Kinetics-layout dataset (real H.264 videos + CSVs) under data/demo/raw
#   3. preprocesses it into WebDataset shards under data/demo/shards
#   4. starts a local Ray cluster and submits pipeline/train.py with `ray job submit`
#   5. prints how to open the MLflow UI and compare runs
# Everything it writes stays in data/ and runs/ of this checkout (both ignored by git).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
scripts/setup_env.sh
PY=.venv/bin/python
export PATH="$ROOT/.venv/bin:$PATH"

DATA="$ROOT/data/demo"
RUNS="$ROOT/runs"
if [ ! -f "$DATA/shards/val.manifest.json" ]; then
    $PY -m preprocessing synth kinetics --out "$DATA/raw" --classes 4 --per-class 40 --val-per-class 8 \
        --seconds 2 --size 96x72
    for csv in train validate; do
        $PY -m preprocessing kinetics --csv "$DATA/raw/annotations/$csv.csv" --videos "$DATA/raw" \
            --out "$DATA/shards" --short-side 72 --shard-samples 20
    done
    $PY -m preprocessing verify "$DATA/shards" --split train
fi

$PY -m pipeline.local_cluster start --num-cpus 4
trap '$PY -m pipeline.local_cluster stop' EXIT
$PY -m pipeline.local_cluster submit -- python pipeline/train.py --config configs/experiment/demo.yaml \
    "data.root=$DATA/shards" "trainer.storage_path=$RUNS" "tracking.tracking_uri=sqlite:///$RUNS/mlflow.db" "$@"

cat <<MSG

Done. The run is in the MLflow store $RUNS/mlflow.db:
  .venv/bin/mlflow ui --backend-store-uri sqlite:///$RUNS/mlflow.db --port 5000      # then open http://127.0.0.1:5000
  .venv/bin/python -m pipeline.compare --experiment demo --tracking-uri sqlite:///$RUNS/mlflow.db --out $RUNS/compare
MSG
