"""MLflow tracking: a SQLite store and an artifact folder inside the project by default.

Absolute paths, so that `dvc exp run` in a temporary folder logs to the same place;
``MLFLOW_TRACKING_URI`` overrides the store. Telemetry is off (``MLFLOW_DISABLE_TELEMETRY``).
MLflow is imported lazily: it costs seconds and only the stages that log need it.

A SQLite store held by another writer (an ``mlflow ui``, a second stage, a backup) makes a write
wait up to MLflow's busy timeout (20 s), then fail with "database is locked". ``Tracker`` retries
such writes with exponential backoff for up to ``D2V_MLFLOW_RETRY_S`` seconds (default 600), so a
locked store delays a run instead of crashing it, and no metric is dropped or written twice.
A store locked for longer fails the stage with a clear error, and the metrics still unsent are
first written to ``mlflow_spool/<run id>.<pid>.jsonl`` beside the store: the next ``Tracker``
(any later tracked stage) sends them to their run once their process has ended, then deletes the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from d2v.config import PROJECT_ROOT

EXPERIMENT = "d2v"
RETRY_S = 600.0  # default total wait for one write while the store is locked (D2V_MLFLOW_RETRY_S)
_BACKOFF_MAX_S = 5.0
_T = TypeVar("_T")
log = logging.getLogger(__name__)


def is_transient(err: BaseException) -> bool:
    """A store error that a later attempt may not see: SQLite "database is locked" / busy."""
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        msg = str(e).lower()
        if "database is locked" in msg or "database table is locked" in msg or "database is busy" in msg:
            return True
        e = e.__cause__ or e.__context__
    return False


def with_retry(what: str, fn: Callable[[], _T], budget_s: float | None = None) -> _T:
    """``fn()``, retried with backoff (0.1 s doubling to 5 s) while it fails with a transient store
    error, for up to ``budget_s`` seconds in all; then the last error, with what was being written."""
    budget = float(os.environ.get("D2V_MLFLOW_RETRY_S", RETRY_S)) if budget_s is None else budget_s
    t0, delay, attempt = time.monotonic(), 0.1, 0
    while True:
        attempt += 1
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - MlflowException, sqlalchemy / sqlite errors
            waited = time.monotonic() - t0
            if not is_transient(e) or waited >= budget:
                if is_transient(e):
                    raise RuntimeError(f"MLflow store {tracking_uri()} stayed locked for {waited:.0f} s "
                                       f"({attempt} attempts) while writing {what}: {str(e).splitlines()[0][:200]}") from e
                raise
            pause = min(delay, _BACKOFF_MAX_S, max(0.0, budget - waited))
            log.warning("MLflow store locked while writing %s (attempt %d); retrying in %.1f s", what, attempt, pause)
            time.sleep(pause)
            delay *= 2


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(PROJECT_ROOT / 'mlflow.db').resolve()}"


def artifact_root() -> str:
    """``mlartifacts/`` beside the SQLite store (the project folder by default)."""
    uri = tracking_uri()
    base = Path(uri[len("sqlite:///"):]).parent if uri.startswith("sqlite:///") else PROJECT_ROOT
    return (base / "mlartifacts").resolve().as_uri()


def spool_dir() -> Path:
    """``mlflow_spool/`` beside the SQLite store (the project folder for other stores)."""
    uri = tracking_uri()
    base = Path(uri[len("sqlite:///"):]).parent if uri.startswith("sqlite:///") else PROJECT_ROOT
    return base / "mlflow_spool"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def replay_spool(client: Any, alive: Callable[[int], bool] | None = None) -> int:
    """Send the metrics that stages which failed on a locked store left in ``spool_dir()`` to their
    runs, and delete each file once sent. Files of a process still running are left to it.
    Returns the number of metrics sent."""
    import mlflow

    alive = alive or _pid_alive
    folder = spool_dir()
    sent = 0
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        run_id, _, pid = path.stem.rpartition(".")
        if not run_id or not pid.isdigit() or alive(int(pid)):
            continue
        try:
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except (OSError, json.JSONDecodeError) as e:
            log.warning("%s: unreadable MLflow spool file (%s); left in place", path, e)
            continue
        metrics = [mlflow.entities.Metric(r["key"], float(r["value"]), int(r["timestamp"]), int(r["step"])) for r in rows]
        try:
            for i in range(0, len(metrics), 1000):
                batch = metrics[i : i + 1000]
                with_retry(f"{len(batch)} spooled metrics of run {run_id}", lambda b=batch, r=run_id: client.log_batch(r, metrics=b))
        except Exception as e:  # noqa: BLE001 - a run deleted or from another store: never stop this stage
            log.warning("%s: could not send its metrics to run %s (%s); left in place", path, run_id,
                        str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
            continue
        path.unlink()
        sent += len(metrics)
        log.warning("sent %d metrics of MLflow run %s that a stage left in %s when the store was locked",
                    len(metrics), run_id, path)
    return sent


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
# A saved view of the runs table: MLflow's UI reads the experiment tag mlflow.sharedViewState.<key>
# when the page's URL says ?viewStateShareKey=<key> (the UI's "share view" feature). Without it the
# table shows no param or metric column until the user picks them.
VIEW_KEY = "d2v-results"
VIEW_COLUMNS = ["attributes.`Dataset`", "tags.`stage`", "tags.`task`", "tags.`init`", "metrics.`test_accuracy`",
                "metrics.`accuracy`", "metrics.`baseline_accuracy`", "metrics.`train_loss`",
                "metrics.`samples_per_s`", "tags.`objective`"]
VIEW_DEFINED_MS = 1796256000000  # 2026-12-03, when this view was defined: the tag only changes with it
VIEW_STATE = json.dumps({"name": "d2v results", "createdAt": VIEW_DEFINED_MS, "updatedAt": VIEW_DEFINED_MS,
                         "state": json.dumps({"selectedColumns": VIEW_COLUMNS, "orderByKey": "attributes.start_time",
                                              "orderByAsc": False, "runsHiddenMode": "SHOW_ALL"})})


def runs_page_url(base: str, experiment_id: str) -> str:
    """The runs table of an experiment with the d2v columns, in MLflow 3's model-training view.

    ``workflowType=machine_learning``: MLflow 3.17's UI otherwise opens every experiment in its GenAI
    (traces) view, whatever the experiment's kind tag says.
    """
    return (f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs"
            f"?workflowType=machine_learning&viewStateShareKey={VIEW_KEY}")


def print_runs_page_url(base: str, experiment: str = EXPERIMENT) -> None:
    """Print the link to the d2v runs table (scripts/mlflow_ui.sh, as the UI starts); quiet if no run yet."""
    from mlflow.tracking import MlflowClient

    exp = MlflowClient(tracking_uri()).get_experiment_by_name(experiment)
    if exp is not None:
        print(f"MLflow: the {experiment} runs with their results: {runs_page_url(base, exp.experiment_id)}", flush=True)


def shard_digest(root: str | Path, modality: str) -> str | None:
    """What identifies ``<root>/shards/<modality>``: the DVC hash ``dvc.lock`` records for it (the
    pipeline's shards), else a hash of its split indexes (which list every shard and its size);
    None when it has no index (never sharded)."""
    shard_dir = Path(root) / "shards" / modality
    lock = Path("dvc.lock")
    if lock.is_file():
        import yaml

        try:
            stages = (yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages", {})
            for st in stages.values():
                for o in st.get("outs") or []:
                    if Path(o.get("path", "")).resolve() == shard_dir.resolve() and o.get("md5"):
                        return str(o["md5"]).removesuffix(".dir")
        except (yaml.YAMLError, OSError, AttributeError):
            pass  # an unreadable lock: the index hash below still identifies the shards
    indexes = sorted(shard_dir.glob("*.json"))
    if not indexes:
        return None
    h = hashlib.sha256()
    for p in indexes:
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:32]


def git_commit(cwd: str | Path = PROJECT_ROOT) -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        return r.stdout.strip() or None if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


class Tracker:
    """One MLflow run; metrics are buffered and sent in batches (one SQLite write per flush)."""

    def __init__(self, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str] | None = None,
                 experiment: str = EXPERIMENT, system_metrics: bool = True, system_interval_s: float = 5.0):
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        import mlflow
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri())
        replay_spool(self.client)  # metrics an earlier stage could not write (store locked too long)
        exp = with_retry("the experiment", lambda: self.client.get_experiment_by_name(experiment))
        exp_id = exp.experiment_id if exp else with_retry(
            "the experiment", lambda: self.client.create_experiment(experiment, artifact_location=artifact_root()))
        wanted = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND,  # without it, MLflow 3 asks which kind on every visit
                  f"mlflow.sharedViewState.{VIEW_KEY}": VIEW_STATE}
        for key, value in wanted.items():
            if exp is None or exp.tags.get(key) != value:
                with_retry("the experiment's tags", lambda k=key, v=value: self.client.set_experiment_tag(exp_id, k, v))
        all_tags = {"git_commit": git_commit() or "unknown", "mlflow.runName": run_name, **(tags or {})}
        for var, tag in (("D2V_PREFECT_FLOW_RUN_ID", "prefect_flow_run_id"), ("D2V_PREFECT_DEPLOYMENT", "prefect_deployment")):
            if os.environ.get(var):  # set by flows/ when a Prefect run started this stage
                all_tags[tag] = os.environ[var]
        self.run = with_retry("a new run", lambda: self.client.create_run(exp_id, tags=all_tags, run_name=run_name))
        self.run_id = self.run.info.run_id
        flat = {k: str(v)[:6000] for k, v in flatten(params).items()}
        items = list(flat.items())
        for i in range(0, len(items), 100):  # MLflow caps params per batch at 100
            batch = [mlflow.entities.Param(k, v) for k, v in items[i : i + 100]]
            with_retry("params", lambda b=batch: self.client.log_batch(self.run_id, params=b))
        self._pending: list[Any] = []
        self._metric = mlflow.entities.Metric
        self._system = None
        if system_metrics:
            # CPU/RAM/disk/network (and GPU where pynvml finds one) as system/* metrics, sampled
            # by MLflow's monitor thread every `system_interval_s` seconds.
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            # its start/stop INFO lines ("Skip logging GPU metrics", ...) in every stage's output say nothing
            logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)

            self._system = SystemMetricsMonitor(self.run_id, sampling_interval=system_interval_s,
                                                tracking_uri=tracking_uri())
            self._system.start()

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        import time

        ts = int(time.time() * 1000)
        self._pending += [self._metric(k, float(v), ts, step) for k, v in metrics.items()]
        if len(self._pending) >= 500:
            self.flush()

    def flush(self) -> None:
        """Write the buffered metrics, 1000 per batch; a batch leaves the buffer once written, so a
        retried or failed flush neither drops nor duplicates metrics. If the store stays locked past
        the retry budget, the unsent metrics are spooled to a file (see ``replay_spool``) first."""
        while self._pending:
            batch = self._pending[:1000]
            try:
                with_retry(f"{len(batch)} metrics", lambda b=batch: self.client.log_batch(self.run_id, metrics=b))
            except RuntimeError as e:  # stayed locked: keep a durable copy before the stage fails
                path = self._spool()
                raise RuntimeError(f"{e}; the {len(self._pending)} unsent metrics are saved in {path} and the "
                                   f"next tracked stage sends them") from e
            del self._pending[: len(batch)]
        self._spool_path().unlink(missing_ok=True)  # all sent: an earlier spool copy is stale

    def _spool_path(self) -> Path:
        return spool_dir() / f"{self.run_id}.{os.getpid()}.jsonl"

    def _spool(self) -> Path:
        """All unsent metrics to the spool file (replaced atomically: the buffer is the full set)."""
        path = self._spool_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps({"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step}) + "\n"
                               for m in self._pending))
        os.replace(tmp, path)
        return path

    def log_shards(self, root: str | Path, modalities: Sequence[str], context: str) -> None:
        """Record the shard sets this run read as MLflow dataset inputs (the runs table's Dataset
        column): name ``<modality>-shards``, source the shard folder, digest :func:`shard_digest`,
        context ``train`` / ``eval`` / ``test``. A shard folder without an index is skipped."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = []
        for m in modalities:
            digest = shard_digest(root, m)
            if digest is None:
                continue
            src = (Path(root) / "shards" / m).resolve()
            ds = Dataset(name=f"{m}-shards", digest=digest, source_type="local", source=json.dumps({"uri": str(src)}))
            inputs.append(DatasetInput(ds, tags=[InputTag("mlflow.data.context", context)]))
        if inputs:
            with_retry("dataset inputs", lambda: self.client.log_inputs(self.run_id, datasets=inputs))

    def artifact(self, path: Path, artifact_path: str | None = None) -> None:
        with_retry(f"artifact {path}", lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))

    def figure(self, fig: Any, artifact_file: str) -> None:
        """A matplotlib figure as a PNG artifact (shown as an image on the run's Artifacts tab); closes it."""
        import matplotlib.pyplot as plt

        try:
            with_retry(f"figure {artifact_file}", lambda: self.client.log_figure(self.run_id, fig, artifact_file))
        finally:
            plt.close(fig)

    def finish(self, status: str = "FINISHED") -> None:
        if self._system is not None:
            self._system.finish()
            self._system = None
        self.flush()
        with_retry(f"run status {status}", lambda: self.client.set_terminated(self.run_id, status=status))
