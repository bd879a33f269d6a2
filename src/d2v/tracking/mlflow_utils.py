"""MLflow tracking: a SQLite store and an artifact folder inside the project by default.

Absolute paths, so that `dvc exp run` in a temporary folder logs to the same place;
``MLFLOW_TRACKING_URI`` overrides the store. Telemetry is off (``MLFLOW_DISABLE_TELEMETRY``).
MLflow is imported lazily: it costs seconds and only the stages that log need it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any, Mapping, Optional

from d2v.config import PROJECT_ROOT

EXPERIMENT = "d2v"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(PROJECT_ROOT / 'mlflow.db').resolve()}"


def artifact_root() -> str:
    """``mlartifacts/`` beside the SQLite store (the project folder by default)."""
    uri = tracking_uri()
    base = Path(uri[len("sqlite:///"):]).parent if uri.startswith("sqlite:///") else PROJECT_ROOT
    return (base / "mlartifacts").resolve().as_uri()


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def git_commit() -> Optional[str]:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10)
        return r.stdout.strip() or None if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


class Tracker:
    """One MLflow run; metrics are buffered and sent in batches (one SQLite write per flush)."""

    def __init__(self, run_name: str, params: Mapping[str, Any], tags: Optional[Mapping[str, str]] = None,
                 experiment: str = EXPERIMENT):
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        import mlflow
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri())
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(experiment, artifact_location=artifact_root())
        all_tags = {"git_commit": git_commit() or "unknown", "mlflow.runName": run_name, **(tags or {})}
        self.run = self.client.create_run(exp_id, tags=all_tags, run_name=run_name)
        self.run_id = self.run.info.run_id
        flat = {k: str(v)[:6000] for k, v in flatten(params).items()}
        items = list(flat.items())
        for i in range(0, len(items), 100):  # MLflow caps params per batch at 100
            self.client.log_batch(self.run_id, params=[mlflow.entities.Param(k, v) for k, v in items[i : i + 100]])
        self._pending: list[Any] = []
        self._metric = mlflow.entities.Metric

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        import time

        ts = int(time.time() * 1000)
        self._pending += [self._metric(k, float(v), ts, step) for k, v in metrics.items()]
        if len(self._pending) >= 500:
            self.flush()

    def flush(self) -> None:
        for i in range(0, len(self._pending), 1000):
            self.client.log_batch(self.run_id, metrics=self._pending[i : i + 1000])
        self._pending = []

    def artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        self.flush()
        self.client.set_terminated(self.run_id, status=status)
