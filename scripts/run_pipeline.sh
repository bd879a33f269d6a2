#!/usr/bin/env bash
# The main job: set up (once) and run the whole pipeline on the embedded default with DVC.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
dvc repro "$@"
echo
dvc metrics show
