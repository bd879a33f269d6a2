"""MLflow model registry: register the pretrained encoder and the fine-tuned classifiers, and move
the alias ``champion`` only when a new version beats the current champion on its metric.

* ``<prefix>-encoder``: the pretrained model as an MLflow pyfunc that returns embeddings
  (``d2v.tracking.pyfunc``), logged into the pretraining run; its metric is the mean linear-probe
  accuracy over the evaluated tasks (``probe_accuracy`` of ``eval_<task>.json``).
* ``<prefix>-<task>-classifier``: the classifier folder (``config.json`` + ``weights.pt``) that
  ``d2v finetune`` logged into its run; its metric is the task's test ``accuracy``.

Every version carries the tags ``metric`` and ``metric_value``; the comparison reads the
champion's tag, so it survives restarts and works across `dvc exp run` experiments.

Two stages registering at once (``dvc queue start -j 2``) take turns: ``register_version`` holds
an exclusive file lock beside the store (``mlflow_spool/registry.lock``) from creating the version
to moving the alias. Without it both could read the old champion and both move the alias (the last write
wins, even when it is the worse model or a tie), or both create the registered model (the second
fails). The lock serialises processes on one machine; a remote tracking server is not covered.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from d2v.errors import InputError

ALIAS = "champion"


@dataclass
class Registration:
    name: str
    version: str
    metric: str
    value: float
    previous_champion: str | None
    previous_value: float | None
    promoted: bool
    source: str


def client():
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    from d2v.tracking.mlflow_utils import tracking_uri

    return MlflowClient(tracking_uri=tracking_uri(), registry_uri=tracking_uri())


def champion(cl, name: str) -> Any | None:
    """The version holding the alias, or None (no such model or no alias yet)."""
    from mlflow.exceptions import MlflowException

    try:
        return cl.get_model_version_by_alias(name, ALIAS)
    except MlflowException:
        return None


def promote_if_better(cl, name: str, version: str, metric: str, value: float, higher_is_better: bool = True) -> Registration:
    """Tag ``version`` with its metric and move ``champion`` to it when it strictly improves."""
    cl.set_model_version_tag(name, version, "metric", metric)
    cl.set_model_version_tag(name, version, "metric_value", repr(float(value)))
    current = champion(cl, name)
    prev_v, prev_value = (str(current.version), float(current.tags.get("metric_value", "nan"))) if current else (None, None)
    better = current is None or prev_value != prev_value or (  # NaN: a champion without a metric loses
        value > prev_value if higher_is_better else value < prev_value)
    if better:
        cl.set_registered_model_alias(name, ALIAS, version)
    mv = cl.get_model_version(name, version)
    return Registration(name, str(version), metric, float(value), prev_v, prev_value, better, mv.source)


def _ensure_model(cl, name: str, description: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        cl.get_registered_model(name)
    except MlflowException:
        cl.create_registered_model(name, description=description)


@contextmanager
def registry_lock() -> Iterator[None]:
    """An exclusive lock, across processes, on the registry of the current store (see the module doc)."""
    import fcntl

    from d2v.tracking.mlflow_utils import spool_dir

    path = spool_dir() / "registry.lock"  # beside the SQLite store, in a folder git ignores
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def register_version(cl, name: str, source: str, run_id: str, metric: str, value: float,
                     description: str = "", tags: dict[str, str] | None = None) -> Registration:
    with registry_lock():  # version numbers in the order of the promotion decisions
        _ensure_model(cl, name, description)
        mv = cl.create_model_version(name, source=source, run_id=run_id or None, tags=tags or {})
        return promote_if_better(cl, name, mv.version, metric, value)


def _read(path: Path) -> dict:
    if not path.is_file():
        raise InputError(f"{path} not found (run the stage that writes it first)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON: {e}") from e


def register_all(tasks: list[str], prefix: str, init: str, reports: Path = Path("reports/metrics"),
                 tokenizer: Path | None = Path("models/tokenizer/spm.model"),
                 out: Path | None = None) -> list[Registration]:
    """Register the encoder and one classifier per task from the stage reports; write ``out``."""
    cl = client()
    regs: list[Registration] = []
    evals = {t: _read(reports / f"eval_{t}.json") for t in tasks}

    for task, ev in evals.items():
        fr = _read(reports / f"finetune_{task}.json")
        run_id = fr.get("mlflow_run_id") or ""
        if not run_id:
            raise InputError(f"{reports / f'finetune_{task}.json'}: no mlflow_run_id (was finetune.track false?)")
        source = f"{cl.get_run(run_id).info.artifact_uri}/classifier"
        regs.append(register_version(
            cl, f"{prefix}-{task}-classifier", source, run_id, f"{ev['split']}_accuracy", float(ev["accuracy"]),
            description=f"data2vec 2.0 {task} classifier (d2v finetune); load with d2v.models.classifier_dir.load_classifier",
            tags={"task": task, "baseline_accuracy": repr(ev["baseline_accuracy"])}))

    pre = _read(reports / "pretrain.json")
    run_id = pre.get("mlflow_run_id") or ""
    if not run_id:
        raise InputError(f"{reports / 'pretrain.json'}: no mlflow_run_id (was train.track false?)")
    from d2v.models.model_dir import load_model_dir, save_model_dir
    from d2v.tracking.pyfunc import log_encoder

    probe = sum(float(e["probe_accuracy"]) for e in evals.values()) / max(1, len(evals))
    model, info = load_model_dir(init, tokenizer_fallback=tokenizer)
    # The tokenizer the checkpoint was trained with (spm file or byte-level), else the project's.
    tok = info.get("tokenizer") or (tokenizer if tokenizer is not None and tokenizer.is_file() else None)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_model_dir(model, Path(tmp) / "encoder", tokenizer=tok, source="pretrain",
                                extra={"probe_accuracy": {t: e["probe_accuracy"] for t, e in evals.items()},
                                       **{k: v for k, v in (info.get("extra") or {}).items() if k == "preprocess"}})
        uri = log_encoder(folder, run_id, artifact_path="encoder")
    regs.append(register_version(
        cl, f"{prefix}-encoder", uri, run_id, "mean_probe_accuracy", probe,
        description="data2vec 2.0 encoder (d2v pretrain) as a pyfunc returning embeddings",
        tags={"tasks": ",".join(tasks)}))

    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"registrations": [asdict(r) for r in regs]}, indent=2))
    return regs
