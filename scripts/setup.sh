#!/usr/bin/env bash
# Create .venv with the pinned stack (requirements.lock) and the d2v package, once.
# Re-installs only when requirements.lock or pyproject.toml change. Safe to run repeatedly.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

PY="${PYTHON:-python3}"
if ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)'; then
  echo "setup: Python 3.11 is required (found $("$PY" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
# Optional system package: flite adds a second synthesizer's voices to the speech test split.
# Installed where we can (root with apt); without it the corpus is espeak-ng only, and the
# download stage says so in its report.
if ! command -v flite >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get install -y -qq --no-install-recommends flite >/dev/null 2>&1 \
    || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends flite >/dev/null 2>&1)) \
    && echo "setup: installed flite (second speech synthesizer)" \
    || echo "setup: could not install flite (optional): apt-get install flite"
fi
# Optional system packages: Debian's chromium and chromium-driver for the browser tests
# (tests/test_browser.py: the MLflow and Prefect UIs rendered in a real browser; ~20 s to install).
# Without them those tests skip and say why. D2V_NO_BROWSER=1 skips the install.
if [ -z "${D2V_NO_BROWSER:-}" ] && ! command -v chromedriver >/dev/null 2>&1 && [ "$(id -u)" = 0 ] \
  && command -v apt-get >/dev/null 2>&1; then
  (apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null 2>&1 \
    || (apt-get update -qq >/dev/null 2>&1 \
        && apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null 2>&1)) \
    && echo "setup: installed chromium + chromium-driver (browser tests)" \
    || echo "setup: could not install chromium (optional; the browser tests will skip): apt-get install chromium chromium-driver"
fi
# The stamp covers what the install depends on: the lock and pyproject.toml without its tool
# settings for pytest and ruff (editing a marker or a lint rule re-installs nothing).
install_inputs() {
  cat requirements.lock
  awk '/^\[/ { skip = ($0 ~ /^\[tool\.(pytest|ruff)/) } !skip' pyproject.toml
}
stamp_want="$(install_inputs | sha256sum | cut -c1-16)"
stamp_have="$(cat .venv/.d2v-stamp 2>/dev/null || true)"
if [ "$stamp_want" != "$stamp_have" ] || ! .venv/bin/python -c 'import d2v' 2>/dev/null; then
  echo "setup: installing the pinned stack into .venv (first time: ~3 min, ~6 GB) ..."
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  # pip's log goes to a file (some machines' global pip config adds missing local wheel folders,
  # one warning per package); on failure the log is shown without that noise.
  pip_or_fail() {
    if ! .venv/bin/pip install -q "$@" > .venv/pip.log 2>&1; then
      grep -v "is ignored: it is neither" .venv/pip.log >&2
      echo "setup: pip install $* failed" >&2
      exit 1
    fi
  }
  # --no-compile: pip would byte-compile all ~20,000 .py files of the stack on one core (minutes);
  # Python compiles the ~6,000 a run imports on first use instead. --no-build-isolation: the
  # editable install uses the pinned setuptools from the lock instead of fetching one.
  pip_or_fail --no-compile -r requirements.lock
  pip_or_fail --no-compile --no-deps --no-build-isolation -e .
  .venv/bin/python -c 'import d2v, torch, torchaudio, dvc, mlflow, prefect, hydra, webdataset, sentencepiece, great_expectations' \
    || { echo "setup: the install is incomplete" >&2; exit 1; }
  echo "$stamp_want" > .venv/.d2v-stamp
fi
