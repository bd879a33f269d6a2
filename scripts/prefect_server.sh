#!/usr/bin/env bash
# The Prefect server and UI on http://127.0.0.1:4200 (loopback only; state in .prefect/). Port: PREFECT_SERVER_API_PORT.
cd "$(dirname "$0")/.." && source scripts/env.sh && exec prefect server start --host 127.0.0.1 --port "${PREFECT_SERVER_API_PORT:-4200}" "$@"
