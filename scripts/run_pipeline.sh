#!/usr/bin/env bash
# The main job: set up (once) and run the whole pipeline on the embedded default with DVC.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
dvc repro "$@"
echo
# Did pretraining help, per task, and how fast (`dvc metrics show` has every number, 35 columns wide).
d2v summary || echo "(some stage reports are missing or unreadable: listed above)"
