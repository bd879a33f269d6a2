#!/usr/bin/env bash
# Set up (once) and run the test suite.
#   bash scripts/test.sh           the CI run (.ci/run): every test except those marked `full` (slower
#                                  duplicates of what quicker tests cover, see pyproject.toml); the
#                                  end-to-end pipeline (tests/test_pipeline.py, the real `dvc repro`,
#                                  with the smaller budgets of conf/experiment/smoke.yaml)
#                                  runs in a second pytest process alongside the rest, with two of the
#                                  three full-scale dry runs, one torch thread each; its log is printed
#                                  after the rest's.
#   bash scripts/test.sh --full    the same, `full` tests included, and the end-to-end pipeline at the
#                                  default budgets instead of experiment=smoke (the opt-in full run).
#   bash scripts/test.sh ARGS...   plain `pytest ARGS` in one process (no marker filter added), e.g.
#                                  -m "not slow", -m "not full", tests/test_model.py
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh

select=(-m "not full")
if [ "${1:-}" = "--full" ]; then
  shift
  select=()
  export D2V_E2E_SMOKE="${D2V_E2E_SMOKE:-0}"  # the end-to-end test at the pipeline's own budgets
fi
if [ $# -gt 0 ]; then
  exec python -m pytest "$@"
fi

# Two processes share the cores: half each (one on the 2-core CI machine). OpenMP threads that
# outnumber the cores spin against each other, so each process gets its share, not all of them.
cores="$(nproc 2>/dev/null || echo 2)"
half=$(( cores / 2 ))
[ "$half" -ge 1 ] || half=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$half}"
export D2V_TEST_THREADS="${D2V_TEST_THREADS:-$OMP_NUM_THREADS}"  # conftest's torch.set_num_threads

# The second process takes the end-to-end pipeline and two of the three full-scale dry runs (the
# longest tests: ~9 and ~2 min each), so that both finish at about the same time.
alongside=(tests/test_pipeline.py "tests/test_full_scale_dry_run.py::test_full_scale_dry_run[image]"
           "tests/test_full_scale_dry_run.py::test_full_scale_dry_run[speech]")
tmp="$(mktemp -d "${TMPDIR:-/tmp}/d2v-tests.XXXXXX")"
e2e_log="$tmp/test_pipeline.log"
echo "test: tests/test_pipeline.py (end-to-end dvc repro, experiment=smoke) and two full-scale dry runs run alongside; their log: $e2e_log"
python -m pytest "${select[@]}" --basetemp "$tmp/e2e" "${alongside[@]}" >"$e2e_log" 2>&1 &
e2e_pid=$!
trap 'kill "$e2e_pid" 2>/dev/null || true' INT TERM

rc=0
python -m pytest "${select[@]}" --ignore=tests/test_pipeline.py --deselect "${alongside[1]}" --deselect "${alongside[2]}" \
  || rc=$?

echo "test: waiting for tests/test_pipeline.py ..."
e2e_rc=0
wait "$e2e_pid" || e2e_rc=$?
trap - INT TERM
echo "==================== tests/test_pipeline.py and the dry runs (ran alongside) ===================="
cat "$e2e_log"
echo "test: rest of the suite exit $rc, tests/test_pipeline.py and the dry runs exit $e2e_rc"
[ "$e2e_rc" -ne 0 ] || rm -rf "$tmp/e2e"  # the pipeline's temporary repo (GBs); kept when it failed
[ "$rc" -eq 0 ] && [ "$e2e_rc" -eq 0 ]
