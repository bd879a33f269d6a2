#!/usr/bin/env bash
# Serve the d2v deployments (pipeline on cron, retrain-on-change, sweep) to the server of scripts/prefect_server.sh.
cd "$(dirname "$0")/.." && source scripts/env.sh && export PREFECT_API_URL="${PREFECT_API_URL:-http://127.0.0.1:${PREFECT_SERVER_API_PORT:-4200}/api}" && exec python -m flows.serve "$@"
