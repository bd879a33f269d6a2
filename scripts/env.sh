# Environment for every d2v entry point: no telemetry, Prefect state inside the project.
export DO_NOT_TRACK=true
export MLFLOW_DISABLE_TELEMETRY=true
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=90
export PREFECT_HOME="${PREFECT_HOME:-$PWD/.prefect}"
export DVC_NO_ANALYTICS=1
export GX_ANALYTICS_ENABLED=false
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
export HF_HUB_OFFLINE=1
export PATH="$PWD/.venv/bin:$PATH"
