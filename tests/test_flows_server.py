"""The flows against a real Prefect server on 127.0.0.1, started once for this module.

The server is ``scripts/prefect_server.sh`` on a free port with a temporary PREFECT_HOME, UI on as
users run it. The DVC repository is the toy of test_flows.py (seconds per stage): the
pipeline flow runs it to completion, a failing stage fails the flow with its error in the
run's log, ``python -m flows.serve`` creates the scheduled deployment and a triggered run
completes, its pages render in a real Chromium (tests/browser.py), Ctrl+C pauses the schedule,
and the sweep and retrain flows do their jobs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from browser import Browser
from test_flows import BROKEN_MESSAGE, ROOT, make_toy_repo, sh  # importing test_flows also puts flows/ on sys.path

pytestmark = pytest.mark.prefect

STARTUP_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(home: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="true",
               **extra)
    env.pop("PREFECT_API_URL", None)
    return env


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory) -> Iterator[str]:
    """A real ``prefect server start`` on a free loopback port; yields its API URL (set as PREFECT_API_URL)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.errors import ServerUnreachableError
    from flows.server import check_server

    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    log = open(home / "server.log", "w")
    proc = subprocess.Popen(["bash", str(ROOT / "scripts/prefect_server.sh")], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, env=server_env(home, PREFECT_SERVER_API_PORT=str(port)),
                            start_new_session=True)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        try:
            check_server(url, timeout=2)
            break
        except ServerUnreachableError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop(proc)
                pytest.fail(f"prefect server did not start: {(home / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=10)  # send the last logs while the server is still up
    finally:
        stop(proc)
        log.close()


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A fresh toy repo: nothing has run yet."""
    return make_toy_repo(tmp_path_factory.mktemp("flows-server") / "toy")


def run_logs(flow_run_id, wait_for: str = "", timeout: float = 30) -> list[tuple[int, str]]:
    """(level, message) of every log of a flow run and its tasks, once ``wait_for`` shows up."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    deadline = time.monotonic() + timeout
    while True:
        logs: list[tuple[int, str]] = []
        with get_client(sync_client=True) as client:
            while True:
                page = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                                        limit=200, offset=len(logs))
                logs += [(log.level, log.message) for log in page]
                if len(page) < 200:
                    break
        if any(wait_for in m for _, m in logs) or time.monotonic() > deadline:
            return logs
        time.sleep(0.5)


def test_pipeline_flow_runs_the_smoke_pipeline_to_completion(prefect_api: str, repo: Path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.pipeline import pipeline_flow

    state = pipeline_flow(repo=str(repo), stages=["prep", "train"], retries=0, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["ran"] == ["prep@a", "prep@b", "train"]
    run_id = json.loads((repo / "metrics.json").read_text())["mlflow_run_id"]
    assert run_id in result["mlflow_run_ids"] and "probe-4" in result["mlflow_run_ids"]
    assert result["outs"] == {"prep@a": ["data/a.txt"], "prep@b": ["data/b.txt"], "train": ["model.txt", "metrics.json"]}
    assert result["dvc_experiment"] is None
    flow_run_id = state.state_details.flow_run_id
    messages = [m for _, m in run_logs(flow_run_id, wait_for="training with lr 0.1")]
    assert "training with lr 0.1 width 4" in messages and "a note on stderr" in messages  # streamed, stdout + stderr
    assert "Running stage 'train':" in messages
    assert f"prefect flow run: {flow_run_id}" in messages  # stages see D2V_PREFECT_FLOW_RUN_ID (to tag their runs)
    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    assert sorted(t.name for t in tasks) == ["dvc repro prep@a", "dvc repro prep@b", "dvc repro train"]
    assert all(t.state.is_completed() for t in tasks)


def test_a_failing_stage_fails_the_flow_with_its_error_in_the_log(prefect_api: str, repo: Path):
    from flows.pipeline import pipeline_flow

    state = pipeline_flow(repo=str(repo), stages=["broken"], retries=1, retry_delay_seconds=0, return_state=True)
    assert state.is_failed()
    assert "stage 'broken' (dvc repro broken) failed with exit code" in state.message
    logs = run_logs(state.state_details.flow_run_id, wait_for="Finished in state Failed")
    messages = [m for _, m in logs]
    assert messages.count(BROKEN_MESSAGE) == 2  # the stage's own stderr, streamed: first try and one retry
    errors = "\n".join(m for level, m in logs if level >= 40)
    assert "failed to reproduce 'broken'" in errors and BROKEN_MESSAGE in errors  # DVC's error + the task's exception


@dataclass
class Served:
    """``python -m flows.serve`` serving the scheduled deployment, after one triggered run."""

    proc: subprocess.Popen
    log: Path
    deployment: Any
    run: Any


@pytest.fixture(scope="module")
def served(prefect_api: str, repo: Path, tmp_path_factory) -> Iterator[Served]:
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    tmp = tmp_path_factory.mktemp("serve")
    out = open(tmp / "serve.log", "w")
    serve = subprocess.Popen(
        [sys.executable, "-m", "flows.serve", "--repo", str(repo), "--only", "pipeline", "--pipeline-cron",
         "0 3 * * *", "--stage", "prep", "--stage", "train", "--retries", "0", "--api-url", prefect_api],
        cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        env=server_env(tmp / "home", PREFECT_RUNNER_POLL_FREQUENCY="1"))  # default: polls every 10 s
    try:
        deadline = time.monotonic() + 120
        with get_client(sync_client=True) as client:
            while True:
                try:
                    dep = client.read_deployment_by_name("d2v-pipeline/scheduled")
                    break
                except ObjectNotFound:
                    assert serve.poll() is None, (tmp / "serve.log").read_text()
                    assert time.monotonic() < deadline, "the deployment never appeared"
                    time.sleep(0.5)
        run = run_deployment("d2v-pipeline/scheduled", parameters={"stages": ["train"], "experiment": "fast",
                                                                   "exp_name": "served-fast"},
                             timeout=240, poll_interval=1, as_subflow=False)
        yield Served(serve, tmp / "serve.log", dep, run)
    finally:
        stop(serve)
        out.close()


def test_served_deployment_has_its_schedule_and_a_triggered_run_completes(served: Served, repo: Path):
    dep, run = served.deployment, served.run
    assert [(s.schedule.cron, s.active) for s in dep.schedules] == [("0 3 * * *", True)]
    assert dep.parameters["repo"] == str(repo) and dep.parameters["stages"] == ["prep", "train"]
    assert run.state.is_completed(), (served.log.read_text()[-3000:], run.state)
    messages = [m for _, m in run_logs(run.id, wait_for="Experiment has been saved as: served-fast")]
    assert "training with lr 0.5 width 8" in messages  # the experiment's params, composed by Hydra
    refs = sh(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], repo).stdout
    assert "/served-fast" in refs


def test_prefect_ui_in_a_browser_shows_the_schedule_and_a_runs_tasks_and_logs(served: Served, browser: Browser,
                                                                             prefect_api: str):
    """The pages a user opens in the Prefect UI, rendered by Chromium (the DOM after the app's scripts ran)."""
    ui = prefect_api.removesuffix("/api")
    run = served.run
    assert run.state.is_completed(), run.state
    # Deployments: the scheduled pipeline, with its cron schedule in words
    text = browser.page(f"{ui}/deployments", "d2v-pipeline", "scheduled")
    assert "At 03:00 AM" in text, text[:2000]
    browser.screenshot("prefect-deployments")
    browser.page(f"{ui}/deployments/deployment/{served.deployment.id}", "scheduled", "At 03:00 AM")
    # the triggered flow run: completed, its log lines, then its task runs (one per DVC stage it ran)
    browser.page(f"{ui}/runs/flow-run/{run.id}", run.name, "Completed", "training with lr 0.5 width 8")
    browser.screenshot("prefect-flow-run-logs")
    browser.click_text("Task Runs")
    browser.wait_for("dvc repro train", "set params: ['experiment=fast']", "dvc exp save -n served-fast",
                     "(3 Completed)")
    browser.screenshot("prefect-flow-run-tasks")


def test_ctrl_c_stops_serving_and_pauses_the_schedule(served: Served):
    from prefect.client.orchestration import get_client

    served.proc.send_signal(signal.SIGINT)  # Ctrl+C: stop serving, pause the deployment's schedule
    # Shutdown pauses the schedule through the API first: slow on a loaded 2-core box (>60 s seen once).
    assert served.proc.wait(timeout=180) == 0, served.log.read_text()[-2000:]
    with get_client(sync_client=True) as client:
        assert client.read_deployment(served.deployment.id).paused is True


@pytest.mark.slow  # ~25-50 s: DVC's queue worker starts, then two experiments run in temp folders
def test_sweep_flow_queues_the_grid_and_runs_the_queue(prefect_api: str, repo: Path):
    from flows.sweep import sweep_flow

    result = sweep_flow(repo=str(repo), grid={"train.lr": [0.2, 0.3]}, stages=["train"], name_prefix="grid")
    exps = {e["name"]: e for e in result["experiments"]}
    assert set(exps) == {"grid-1", "grid-2"} and result["failed"] == []
    assert exps["grid-1"]["overrides"] == ["train.lr=0.2"] and exps["grid-2"]["overrides"] == ["train.lr=0.3"]
    lrs = {n: e["metrics"]["metrics.json"]["lr"] for n, e in exps.items()}
    assert lrs == {"grid-1": 0.2, "grid-2": 0.3}
    ids = {e["mlflow_run_ids"]["metrics.json:mlflow_run_id"] for e in exps.values()}
    assert len(ids) == 2


def test_retrain_flow_runs_only_when_dvc_status_reports_changes(prefect_api: str, repo: Path):
    from flows.retrain import retrain_flow

    params = repo / "params.yaml"
    params.write_text(re.sub(r"lr: [0-9.e-]+", "lr: 0.25", params.read_text()))  # a value never run before
    result = retrain_flow(repo=str(repo), stages=["train"], retries=0)
    assert result["ran"] is True and result["changes"] == {"train": ["deps: params.yaml (train.lr: modified)"]}
    assert result["pipeline"]["ran"] == ["train"]
    again = retrain_flow(repo=str(repo), stages=["train"], retries=0)
    assert again == {"repo": str(repo), "ran": False, "changes": {}, "pipeline": None}
