#!/usr/bin/env bash
# MLflow UI on the project's store (mlflow.db + mlartifacts/) at http://127.0.0.1:5000 (loopback only). Port: MLFLOW_PORT.
cd "$(dirname "$0")/.." && source scripts/env.sh && exec mlflow ui --backend-store-uri "${MLFLOW_TRACKING_URI:-sqlite:///$PWD/mlflow.db}" --host 127.0.0.1 --port "${MLFLOW_PORT:-5000}" --workers 1 "$@"
