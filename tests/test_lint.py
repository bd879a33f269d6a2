"""Lint: `ruff check` over the repository (rules in pyproject.toml's [tool.ruff]) reports nothing.

Most findings are fixed by `ruff check --fix` (import order, unused imports, pyupgrade); the
rest are named in the failure message with their file and line.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff() -> list[str]:
    try:
        import ruff  # noqa: F401  (the pinned wheel; `python -m ruff` runs its binary)
    except ImportError:
        exe = shutil.which("ruff")
        if exe is None:
            pytest.fail("ruff is not installed: run `bash scripts/setup.sh` (it is pinned in requirements.lock)")
        return [exe]
    return [sys.executable, "-m", "ruff"]


def test_ruff_check_is_clean():
    env = {**os.environ, "NO_COLOR": "1"}
    proc = subprocess.run(
        [*_ruff(), "check", "--no-cache", "--output-format", "concise", "."],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=300,
    )
    if proc.returncode != 0:
        stats = subprocess.run(
            [*_ruff(), "check", "--no-cache", "--statistics", "."],
            cwd=ROOT, capture_output=True, text=True, env=env, timeout=300,
        )
        pytest.fail(
            "ruff check found problems (most are fixed by `ruff check --fix`):\n"
            f"{proc.stdout}{proc.stderr}\nper rule:\n{stats.stdout}",
            pytrace=False,
        )
