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
    # the loss curve as a picture on the run's page: a real PNG with the lines drawn (not a blank canvas)
    from PIL import Image

    png = client.download_artifacts(res.mlflow_run_id, "plots/pretrain_loss.png", str(tmp_path))
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > 300 and len(set(im.convert("RGB").getdata())) > 20


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


def test_runs_record_the_shard_sets_they_read_and_the_experiment_opens_as_model_training(tmp_path, monkeypatch):
    import json

    import yaml

    from d2v.tracking.mlflow_utils import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, Tracker, runs_page_url, shard_digest

    root = tmp_path / "data"
    for m in ("image", "text"):
        (root / "shards" / m).mkdir(parents=True)
        (root / "shards" / m / "train.json").write_text(json.dumps({"shardlist": [{"url": f"{m}-0.tar", "nsamples": 3}]}))
    monkeypatch.chdir(tmp_path)  # no dvc.lock here: the digest is the hash of the split indexes
    by_index = shard_digest(root, "image")
    assert by_index and by_index != shard_digest(root, "text") and shard_digest(root, "speech") is None
    (root / "shards/image/train.json").write_text(json.dumps({"shardlist": [{"url": "image-0.tar", "nsamples": 4}]}))
    assert shard_digest(root, "image") != by_index  # other shards, another digest
    # the pipeline's shards: the hash DVC recorded for the folder
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"stages": {"shard@image": {"outs": [
        {"path": "data/shards/image", "md5": "0123456789abcdef0123456789abcdef.dir"}]}}}))
    assert shard_digest(root, "image") == "0123456789abcdef0123456789abcdef"

    tracker = Tracker("inputs", {"a": 1}, system_metrics=False)
    tracker.log_shards(root, ["image", "speech", "text"], "train")  # speech has no shards: skipped
    tracker.finish()
    client = MlflowClient(tracking_uri())
    inputs = client.get_run(tracker.run_id).inputs.dataset_inputs
    got = {(i.dataset.name, i.dataset.digest, {t.key: t.value for t in i.tags}["mlflow.data.context"]) for i in inputs}
    assert got == {("image-shards", "0123456789abcdef0123456789abcdef", "train"),
                   ("text-shards", shard_digest(root, "text"), "train")}
    assert json.loads(inputs[0].dataset.source)["uri"].startswith(str(root.resolve()))
    exp = client.get_experiment_by_name("d2v")
    assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    # the saved runs-table view (MLflow's envelope: name, times, the UI state as a JSON string)
    view = json.loads(exp.tags["mlflow.sharedViewState.d2v-results"])
    assert view["name"] == "d2v results" and isinstance(view["createdAt"], int)
    cols = json.loads(view["state"])["selectedColumns"]
    assert {"tags.`task`", "tags.`init`", "metrics.`accuracy`", "metrics.`samples_per_s`"} <= set(cols)
    assert runs_page_url("http://h:5000/", exp.experiment_id) == (
        f"http://h:5000/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning&viewStateShareKey=d2v-results")
