#!/usr/bin/env bash
# The reliability suite in full, slow tests included (a few minutes): fault injection (kill -9
# during pretraining, during a checkpoint write and during shard writing; a full disk; a locked
# MLflow store; a Prefect task that fails once; the training health guards; security defaults)
# and the bad-input corpus. Extra arguments go to pytest (e.g. -x, -k kill).
#   Quick part only (what CI needs, about a minute):  pytest -m "(faults or bad_input) and not slow"
# As root the disk-full tests mount a small tmpfs; elsewhere (or with D2V_FAULTS_NO_TMPFS=1)
# they inject ENOSPC at the file-write boundary instead.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # torch in the tests and the killed child processes
exec python -m pytest -m "faults or bad_input" tests/test_faults.py tests/test_bad_input_corpus.py "$@"
