#!/usr/bin/env bash
# MLflow UI on the project's store (mlflow.db + mlartifacts/) at http://127.0.0.1:5000 (loopback only). Port: MLFLOW_PORT.
# It first prints the link to the d2v runs table with the columns that matter (a saved view).
cd "$(dirname "$0")/.." && source scripts/env.sh
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-sqlite:///$PWD/mlflow.db}"
port="${MLFLOW_PORT:-5000}"
python -c "import sys; from d2v.tracking.mlflow_utils import print_runs_page_url; print_runs_page_url(sys.argv[1])" \
  "http://127.0.0.1:$port" 2>/dev/null || true
exec mlflow ui --backend-store-uri "$MLFLOW_TRACKING_URI" --host 127.0.0.1 --port "$port" --workers 1 "$@"
