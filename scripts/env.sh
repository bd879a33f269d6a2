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
# Bytecode cache: some machines set PYTHONDONTWRITEBYTECODE=1, and then every process recompiles
# the ~4,000 modules it imports (torch, MLflow, ...; 3-8 s each). The cache lives under .venv, not
# beside the sources, so nothing appears in the work tree or in DVC's hashed dependencies.
unset PYTHONDONTWRITEBYTECODE
export PYTHONPYCACHEPREFIX="${PYTHONPYCACHEPREFIX:-$PWD/.venv/.pycache}"
