"""Pretraining logs to a real MLflow SQLite store: params, per-step metrics, artifacts, status."""

from __future__ import annotations

import os

import pytest
from mlflow.tracking import MlflowClient

from d2v.config import load_config
from d2v.models import CollapseError
from d2v.tracking.mlflow_utils import artifact_root, flatten, tracking_uri
from d2v.train.pretrain import pretrain


def cfg(tmp_path, *extra):
    return load_config(["experiment=tiny", "data=sample", "data.num_samples=32", "train.batch_size=4",
                        "train.max_steps=4", f"train.out_dir={tmp_path / 'out'}", *extra])


def test_store_is_the_test_sqlite_and_artifacts_sit_beside_it():
    assert tracking_uri() == os.environ["MLFLOW_TRACKING_URI"] and tracking_uri().startswith("sqlite:///")
    assert artifact_root().startswith("file://") and "d2v-mlflow-" in artifact_root()


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {"a.b": 1, "a.c.d": [1, 2], "e": None}


def test_pretrain_run_is_logged(tmp_path):
    res = pretrain(cfg(tmp_path), progress=False, metrics_path=tmp_path / "m.json", history_path=tmp_path / "h.tsv")
    client = MlflowClient(tracking_uri())
    run = client.get_run(res.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.embed_dim"] == "64" and run.data.params["train.max_steps"] == "4"
    assert run.data.tags["stage"] == "pretrain" and run.data.tags["git_commit"]
    hist = client.get_metric_history(res.mlflow_run_id, "image/loss")
    assert [m.step for m in hist] == [1, 4]  # image is trained at steps 1 and 4 (round robin over 3)
    assert hist[0].value == pytest.approx(res.first_loss["image"]) and hist[-1].value == pytest.approx(res.last_loss["image"])
    assert len(client.get_metric_history(res.mlflow_run_id, "lr")) == 4
    arts = {a.path for a in client.list_artifacts(res.mlflow_run_id, "pretrain")}
    assert "pretrain/checkpoint.pt" in arts and "pretrain/config.json" in arts
    assert {a.path for a in client.list_artifacts(res.mlflow_run_id, "reports")} == {"reports/m.json", "reports/h.tsv"}


def test_a_failed_run_is_marked_failed(tmp_path):
    c = cfg(tmp_path, "model.min_target_var=100.0", "+model.collapse_check_after=0")
    with pytest.raises(CollapseError, match="target variance"):
        pretrain(c, progress=False)
    client = MlflowClient(tracking_uri())
    runs = client.search_runs([client.get_experiment_by_name("d2v").experiment_id], order_by=["attributes.start_time DESC"],
                              max_results=1)
    assert runs[0].info.status == "FAILED"


def test_system_metrics_and_prefect_tags_are_logged(monkeypatch):
    import time

    from mlflow.tracking import MlflowClient

    from d2v.tracking.mlflow_utils import Tracker, tracking_uri

    monkeypatch.setenv("D2V_PREFECT_FLOW_RUN_ID", "flow-run-123")
    tr = Tracker("sysmetrics", {"a": 1}, system_interval_s=0.2)
    time.sleep(1.0)
    tr.log({"loss": 1.0}, 1)
    tr.finish()
    run = MlflowClient(tracking_uri()).get_run(tr.run_id)
    system = [k for k in run.data.metrics if k.startswith("system/")]
    assert any("cpu_utilization" in k for k in system) and any("memory" in k for k in system), system
    assert run.data.tags["prefect_flow_run_id"] == "flow-run-123"
    assert run.data.metrics["loss"] == 1.0
