"""End to end: the real ``dvc repro`` of the embedded default, in a fresh git repository.

This is the README's main job minus the install: the project's own dvc.yaml and params.yaml,
run by DVC in a temporary git repo, must produce the model, the metrics and the plot, with the
loss falling for every modality; a second ``dvc repro`` must find nothing to do.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from d2v.config import PROJECT_ROOT

BIN = Path(sys.executable).parent


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", DVC_NO_ANALYTICS="1", DO_NOT_TRACK="true")
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pipeline")
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(PROJECT_ROOT / name, root / name)
    for name in ("conf", "src"):
        shutil.copytree(PROJECT_ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    run(["git", "init", "-q"], root)
    run(["git", "config", "user.email", "ci@example.com"], root)
    run(["git", "config", "user.name", "ci"], root)
    run([str(BIN / "dvc"), "init", "-q"], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "init"], root)
    return root


def test_dvc_repro_runs_the_embedded_default(repo: Path):
    r = run([str(BIN / "dvc"), "repro"], repo)
    assert "Running stage 'pretrain'" in r.stdout
    assert (repo / "models/pretrain/checkpoint.pt").is_file()
    metrics = json.loads((repo / "reports/metrics/pretrain.json").read_text())
    for m in ("image", "speech", "text"):
        assert metrics["final_loss"][m] < metrics["first_loss"][m], (m, metrics)
    rows = (repo / "reports/plots/pretrain_loss.tsv").read_text().splitlines()
    assert rows[0].split("\t")[:3] == ["step", "modality", "loss"] and len(rows) == 1 + metrics["steps"]
    # DVC sees the outputs: a second repro has nothing to do, and metrics show reads the file
    again = run([str(BIN / "dvc"), "repro"], repo)
    assert "didn't change, skipping" in again.stdout or "is cached" in again.stdout or "up to date" in again.stdout
    shown = run([str(BIN / "dvc"), "metrics", "show", "--json"], repo)
    assert "final_loss" in shown.stdout
