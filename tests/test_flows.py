"""Prefect flows (flows/): the task bodies and the input checks, without a Prefect server.

A tiny git + DVC repository stands in for the project: ``prep@a``/``prep@b`` (foreach), ``train``
(reads params.yaml, writes metrics.json with an ``mlflow_run_id``) and ``broken`` (fails with a
recognisable message); conf/ holds Hydra groups ``model`` and ``experiment``. Task bodies run
through ``task.fn``; the flows against a real server are in test_flows_server.py.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # flows/ lives beside src/, outside the installed package
    sys.path.insert(0, str(ROOT))

from conftest import make_project_repo  # noqa: E402

from flows.errors import (  # noqa: E402
    FlowInputError,
    NotADvcRepoError,
    ServerUnreachableError,
    StageFailedError,
    StageTimeoutError,
    UnknownParamError,
    UnknownStageError,
    report_error,
)
from flows.overrides import (  # noqa: E402
    apply_params,
    experiment_overrides,
    format_value,
    grid_overrides,
    parse_grid_arg,
    validate_overrides,
)
from flows.results import collect_run_ids, find_run_ids  # noqa: E402
from flows.server import check_server  # noqa: E402
from flows.stages import check_repo, list_stages, parse_status, require_git, resolve_stages, select_stages  # noqa: E402
from flows.streaming import child_env, run_streaming  # noqa: E402

BIN = Path(sys.executable).parent
BROKEN_MESSAGE = "BOOM: the broken stage failed on purpose"

TRAIN_PY = """\
import json, os, sys, uuid, yaml
p = yaml.safe_load(open("params.yaml"))
print("training with lr", p["train"]["lr"], "width", p["model"]["width"])
print("prefect flow run:", os.environ.get("D2V_PREFECT_FLOW_RUN_ID", "-"))
print("a note on stderr", file=sys.stderr)
json.dump({"lr": p["train"]["lr"], "mlflow_run_id": uuid.uuid4().hex,
           "eval": {"probe_run_id": "probe-" + str(p["model"]["width"])}, "steps": 3},
          open("metrics.json", "w"))
open("model.txt", "w").write("model")
"""

BROKEN_PY = """\
import sys
print("checking the input ...")
print("BOOM: the broken stage failed on purpose", file=sys.stderr)
sys.exit(3)
"""

DVC_YAML = """\
stages:
  prep:
    foreach: [a, b]
    do:
      cmd: mkdir -p data && echo ${item} > data/${item}.txt
      outs:
        - data/${item}.txt
  train:
    cmd: python train.py
    deps: [data/a.txt, data/b.txt, train.py]
    params: [train.lr, model.width]
    outs: [model.txt]
    metrics:
      - metrics.json:
          cache: false
  broken:
    cmd: python broken.py
    outs: [never.txt]
"""


def sh(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, env=child_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{cmd}: {r.stdout}\n{r.stderr}"
    return r


def make_toy_repo(root: Path) -> Path:
    """A tiny git + DVC repo with Hydra composition (conf/config.yaml), committed."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "conf/model").mkdir(parents=True)
    (root / "conf/experiment").mkdir(parents=True)
    (root / "conf/config.yaml").write_text(
        "defaults:\n  - model: small\n  - _self_\n  - experiment: null\n\ntrain:\n  lr: 0.1\n  steps: 3\n")
    (root / "conf/model/small.yaml").write_text("width: 4\n")
    (root / "conf/model/big.yaml").write_text("width: 8\n")
    (root / "conf/experiment/fast.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /model: big\ntrain:\n  lr: 0.5\n")
    (root / "params.yaml").write_text("train:\n  lr: 0.1\n  steps: 3\nmodel:\n  width: 4\n")
    (root / "train.py").write_text(TRAIN_PY)
    (root / "broken.py").write_text(BROKEN_PY)
    (root / "dvc.yaml").write_text(DVC_YAML)
    sh(["git", "init", "-q"], root)
    sh(["git", "config", "user.email", "ci@example.com"], root)
    sh(["git", "config", "user.name", "ci"], root)
    sh([str(BIN / "dvc"), "init", "-q"], root)
    with open(root / ".dvc/config", "a") as f:
        f.write("[core]\n    autostage = true\n[hydra]\n    enabled = true\n")
    sh(["git", "add", "-A"], root)
    sh(["git", "commit", "-qm", "init"], root)
    return root


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    """A toy repo with prep and train already run (read-only for the tests that use it)."""
    root = make_toy_repo(tmp_path_factory.mktemp("flows") / "toy")
    sh([str(BIN / "dvc"), "repro", "train"], root)
    sh(["git", "add", "-A"], root)
    sh(["git", "commit", "-qm", "run"], root)
    return root


@pytest.fixture
def toy_copy(toy: Path, tmp_path: Path) -> Path:
    """A private copy of ``toy`` for tests that change it."""
    dst = tmp_path / "toy"
    shutil.copytree(toy, dst, symlinks=True)
    return dst


# ---------------------------------------------------------------------------------------------
# Repository and stages


def test_not_a_dvc_repo_is_a_clear_error(tmp_path: Path):
    with pytest.raises(NotADvcRepoError, match="does not exist"):
        check_repo(tmp_path / "missing")
    with pytest.raises(NotADvcRepoError, match=r"is not a DVC repository \(no \.dvc/ folder\)") as e:
        check_repo(tmp_path)
    assert str(tmp_path) in str(e.value)
    (tmp_path / ".dvc").mkdir()
    with pytest.raises(NotADvcRepoError, match="no dvc.yaml"):
        check_repo(tmp_path)


def test_stages_come_from_dvc_in_pipeline_order(toy: Path):
    stages = list_stages(toy)
    names = [s.name for s in stages]
    assert names == ["prep@a", "prep@b", "train", "broken"]
    by = {s.name: s for s in stages}
    assert by["train"].outs == ("model.txt", "metrics.json") and by["train"].metrics == ("metrics.json",)
    assert by["prep@b"].group == "prep" and by["train"].group == "train"


def test_resolve_stages_groups_order_and_unknown_names(toy: Path):
    stages = list_stages(toy)
    assert resolve_stages(None, stages) == ["prep@a", "prep@b", "train", "broken"]
    assert resolve_stages(["train", "prep"], stages) == ["prep@a", "prep@b", "train"]
    assert resolve_stages(["prep@b"], stages) == ["prep@b"]
    with pytest.raises(UnknownStageError) as e:
        resolve_stages(["train", "pretrian"], stages)
    msg = str(e.value)
    assert "'pretrian'" in msg and "valid stages: prep@a, prep@b, train, broken" in msg and "groups: prep" in msg
    root, infos, names = select_stages(str(toy), ["prep"])
    assert root == toy.resolve() and infos == stages and names == ["prep@a", "prep@b"]


def test_stage_timeouts_by_stage_or_group(toy: Path):
    from flows.pipeline import stage_timeouts

    stages = list_stages(toy)
    got = stage_timeouts(["prep@a", "prep@b", "train"], 100.0, {"prep": 5, "prep@b": 7}, stages)
    assert got == {"prep@a": 5, "prep@b": 7, "train": 100.0}
    with pytest.raises(UnknownStageError, match="nope"):
        stage_timeouts(["train"], 100.0, {"nope": 1}, stages)


# ---------------------------------------------------------------------------------------------
# Overrides, experiments and sweep grids


def test_overrides_are_checked_against_params_and_config_groups(toy: Path):
    ok = ["train.lr=5e-4", "model=big", "experiment=fast", "+extra.key=1", "params.yaml:train.steps=4",
          "experiment=null", "train=null"]
    assert validate_overrides(toy, ok) == ok
    with pytest.raises(UnknownParamError, match=r"unknown parameter 'train\.lrr'.*top-level keys: model, train"):
        validate_overrides(toy, ["train.lrr=1"])
    with pytest.raises(UnknownParamError, match="'huge' is not an option of the config group 'model'; options: big, small"):
        validate_overrides(toy, ["model=huge"])
    with pytest.raises(FlowInputError, match="expected key=value"):
        validate_overrides(toy, ["train.lr"])
    with pytest.raises(UnknownParamError, match="no Hydra 'experiment' config group"):
        experiment_overrides(_repo_without_experiments(toy), "fast", None)
    assert experiment_overrides(toy, "fast", ["train.lr=1"]) == ["experiment=fast", "train.lr=1"]
    with pytest.raises(UnknownParamError, match="'slow' is not an option of the config group 'experiment'"):
        experiment_overrides(toy, "slow", None)


def _repo_without_experiments(toy: Path) -> Path:
    root = toy.parent / "no-experiments"
    if not root.exists():
        shutil.copytree(toy, root, symlinks=True)
        shutil.rmtree(root / "conf/experiment")
    return root


def test_grid_combinations_and_value_formatting():
    combos = grid_overrides({"train.lr": [1e-4, 5e-4], "model": ["small", "big"]})
    assert combos == [["train.lr=0.0001", "model=small"], ["train.lr=0.0001", "model=big"],
                      ["train.lr=0.0005", "model=small"], ["train.lr=0.0005", "model=big"]]
    assert grid_overrides({"flag": [True, None]}) == [["flag=true"], ["flag=null"]]
    assert format_value("a,b") == "'a,b'" and format_value([1, "x"]) == "[1,x]"
    assert grid_overrides({"seed": 3}) == [["seed=3"]]
    with pytest.raises(FlowInputError, match="empty"):
        grid_overrides({})
    with pytest.raises(FlowInputError, match="no values for 'seed'"):
        grid_overrides({"seed": []})
    assert parse_grid_arg(["train.lr=1e-4, 5e-4", "model=big"]) == {"train.lr": ["1e-4", "5e-4"], "model": ["big"]}
    with pytest.raises(FlowInputError, match="expected key=v1,v2"):
        parse_grid_arg(["train.lr"])


def test_a_sweep_over_an_unknown_key_is_refused_before_queueing(toy_copy: Path):
    from flows.sweep import validate_sweep_args

    with pytest.raises(UnknownParamError, match="unknown parameter 'train.momentum'"):
        validate_sweep_args(str(toy_copy), {"train.lr": [0.1], "train.momentum": [0.9, 0.99]})
    with pytest.raises(UnknownParamError, match="'medium' is not an option of the config group 'model'"):
        validate_sweep_args(str(toy_copy), {"model": ["small", "medium"]})
    queued = subprocess.run([str(BIN / "dvc"), "queue", "status"], cwd=toy_copy, env=child_env(),
                            capture_output=True, text=True).stdout
    assert "Queued" not in queued
    root, combos, base, targets = validate_sweep_args(str(toy_copy), {"model": ["small", "big"]}, "fast", None, ["train"])
    assert combos == [["model=small"], ["model=big"]] and base == ["experiment=fast"] and targets == ["train"]


def test_the_glue_preset_is_the_papers_grid_and_valid_for_this_project(monkeypatch):
    """``--preset glue``: the four learning rates data2vec 2.0's README sweeps per GLUE task, over the
    text fine-tuning and evaluation stages of this project's dvc.yaml, checked against its params.yaml
    and config groups before anything would be queued."""
    import flows.sweep as sweep

    preset = sweep.PRESETS["glue"]
    root, combos, base, targets = sweep.validate_sweep_args(str(ROOT), preset["grid"], "text_base", None,
                                                            preset["stages"])
    assert combos == [[f"finetune.text.lr={lr}"] for lr in (1e-5, 2e-5, 4e-5, 6e-5)]
    assert base == ["experiment=text_base"] and targets == ["finetune@text", "evaluate@text"]
    from flows.errors import FlowInputError

    seen = {}

    def stop_before_queueing(*args):
        seen["args"] = args
        raise FlowInputError("stopped by the test")

    monkeypatch.setattr(sweep, "validate_sweep_args", stop_before_queueing)
    assert sweep.main(["--repo", str(ROOT), "--preset", "glue", "-g", "seed=1,2"]) == 2
    assert seen["args"][1] == {"finetune.text.lr": ["1e-05", "2e-05", "4e-05", "6e-05"], "seed": ["1", "2"]}
    assert seen["args"][4] == ["finetune@text", "evaluate@text"]


def test_apply_params_composes_like_dvc_exp_run(toy_copy: Path):
    import yaml

    apply_params(toy_copy, ["experiment=fast", "train.steps=9"])
    p = yaml.safe_load((toy_copy / "params.yaml").read_text())
    assert p["train"] == {"lr": 0.5, "steps": 9} and p["model"] == {"width": 8}


def test_experiments_need_git(toy: Path, tmp_path: Path):
    bare = tmp_path / "nogit"
    shutil.copytree(toy, bare, symlinks=True, ignore=shutil.ignore_patterns(".git"))
    with pytest.raises(FlowInputError, match="need a git repository"):
        require_git(bare)


# ---------------------------------------------------------------------------------------------
# Results, status and the streaming runner


def test_run_ids_are_collected_from_json_outputs(tmp_path: Path):
    (tmp_path / "m.json").write_text(json.dumps(
        {"mlflow_run_id": "a1", "eval": {"probe_run_id": "b2", "finetune_run_id": "c3", "acc": 0.5},
         "run_ids": ["not", "a", "string"]}))
    (tmp_path / "bad.json").write_text("{not json")
    got = collect_run_ids(tmp_path, ["m.json", "bad.json", "missing.json", "model.txt"])
    assert got == {"m.json:mlflow_run_id": "a1", "m.json:eval.probe_run_id": "b2", "m.json:eval.finetune_run_id": "c3"}
    assert find_run_ids({"a": {"x_run_id": "r", "empty_run_id": ""}, "run_id": 3}) == {"a.x_run_id": "r"}


def test_dvc_status_is_summarised_per_stage():
    status = {"train": [{"changed deps": {"params.yaml": {"train.lr": "modified"}, "data/a.txt": "modified"}},
                        {"changed outs": {"model.txt": "deleted"}}, "always changed"]}
    assert parse_status(status) == {"train": [
        "deps: params.yaml (train.lr: modified)", "deps: data/a.txt modified", "outs: model.txt deleted",
        "always changed"]}


def test_run_streaming_passes_every_line_with_its_level(tmp_path: Path):
    import logging

    code = ("import sys\nprint('one')\nprint('ERROR: two', file=sys.stderr)\nsys.stdout.flush()\n"
            "print('WARNING: three')\nprint('Running stage \\'x\\':')\nsys.exit(4)\n")
    seen: list[tuple[int, str]] = []
    res = run_streaming([sys.executable, "-c", code], tmp_path, lambda lvl, line: seen.append((lvl, line)))
    assert [line for _, line in seen] == ["one", "ERROR: two", "WARNING: three", "Running stage 'x':"]
    assert [lvl for lvl, _ in seen] == [logging.INFO, logging.ERROR, logging.WARNING, logging.INFO]
    assert res.returncode == 4 and not res.ok and res.ran_stages == ["x"]
    assert "failed with exit code 4" in res.error_text("cmd") and "ERROR: two" in res.error_text("cmd")
    with pytest.raises(StageFailedError, match="cmd failed with exit code 4") as e:
        res.raise_on_failure("cmd")
    assert not isinstance(e.value, StageTimeoutError)


def test_run_streaming_kills_the_whole_command_on_timeout(tmp_path: Path):
    marker = tmp_path / "child.pid"
    code = (f"import subprocess, sys, time\np = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            f"open({str(marker)!r}, 'w').write(str(p.pid))\nprint('started', flush=True)\ntime.sleep(60)\n")
    t0 = time.monotonic()
    res = run_streaming([sys.executable, "-c", code], tmp_path, lambda *_: None, timeout=2)
    assert res.timed_out and not res.ok and time.monotonic() - t0 < 20
    assert "timed out after" in res.error_text("stage 'x'")
    with pytest.raises(StageTimeoutError, match="timed out after"):
        res.raise_on_failure("stage 'x'")
    child = int(marker.read_text())
    time.sleep(0.5)
    assert not Path(f"/proc/{child}").exists() or "zombie" in Path(f"/proc/{child}/status").read_text().lower()


def test_unreachable_server_is_named_in_the_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api"
    t0 = time.monotonic()
    with pytest.raises(ServerUnreachableError) as e:
        check_server(url, timeout=2)
    assert url in str(e.value) and "scripts/prefect_server.sh" in str(e.value) and time.monotonic() - t0 < 5


# ---------------------------------------------------------------------------------------------
# Task bodies (task.fn: no Prefect engine, plain logging)


def test_run_stage_task_runs_dvc_repro_and_returns_outs_and_run_ids(toy_copy: Path):
    from flows.pipeline import run_stage

    before = json.loads((toy_copy / "metrics.json").read_text())["mlflow_run_id"]
    r = run_stage.fn(str(toy_copy), "train", outs=["model.txt", "metrics.json"])
    assert r["stage"] == "train" and r["ran"] is False and r["ran_stages"] == []  # up to date
    assert r["mlflow_run_ids"] == {"metrics.json:mlflow_run_id": before, "metrics.json:eval.probe_run_id": "probe-4"}
    r = run_stage.fn(str(toy_copy), "train", outs=["model.txt", "metrics.json"], force=True)
    after = json.loads((toy_copy / "metrics.json").read_text())["mlflow_run_id"]
    assert r["ran"] is True and r["ran_stages"] == ["train"] and after != before
    assert r["mlflow_run_ids"]["metrics.json:mlflow_run_id"] == after and r["outs"] == ["model.txt", "metrics.json"]


def test_run_stage_task_raises_with_the_stage_error(toy_copy: Path):
    from flows.pipeline import run_stage

    with pytest.raises(StageFailedError) as e:
        run_stage.fn(str(toy_copy), "broken")
    msg = str(e.value)
    assert "stage 'broken'" in msg and "exit code" in msg and BROKEN_MESSAGE in msg


def test_experiment_tasks_compose_params_and_save_a_dvc_experiment(toy_copy: Path):
    from flows.pipeline import compose_params, run_stage, save_experiment

    assert compose_params.fn(str(toy_copy), ["experiment=fast"]) == ["params.yaml"]
    r = run_stage.fn(str(toy_copy), "train", outs=["metrics.json"])
    assert r["ran"] and r["mlflow_run_ids"]["metrics.json:eval.probe_run_id"] == "probe-8"
    assert save_experiment.fn(str(toy_copy), "fast-1", ["train"]) == "fast-1"  # 'broken' never ran: not saved
    refs = sh(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], toy_copy).stdout.split()
    ref = next(r for r in refs if r.endswith("/fast-1"))
    assert "lr: 0.5" in sh(["git", "show", f"{ref}:params.yaml"], toy_copy).stdout


def test_check_changes_task_reports_changed_params(toy_copy: Path):
    from flows.retrain import check_changes

    assert check_changes.fn(str(toy_copy), ["train"]) == {}
    params = toy_copy / "params.yaml"
    params.write_text(params.read_text().replace("lr: 0.1", "lr: 0.2"))
    assert check_changes.fn(str(toy_copy), ["train"]) == {"train": ["deps: params.yaml (train.lr: modified)"]}


def test_queue_experiment_task_queues_with_name_and_overrides(toy_copy: Path):
    from flows.sweep import queue_experiment

    assert queue_experiment.fn(str(toy_copy), "q-lr", ["experiment=fast", "train.lr=0.3"], ["train"]) == "q-lr"
    stash = sh(["git", "reflog", "show", "--format=%gs", "refs/exps/celery/stash"], toy_copy).stdout
    assert stash.strip().endswith(":q-lr"), stash  # DVC's queue: one stash entry per queued experiment


def test_a_sweep_experiment_that_did_not_finish_is_reported_failed(toy: Path):
    from flows.sweep import collect_experiments

    got = collect_experiments.fn(str(toy), ["never-ran"])
    assert [(e["name"], e["status"]) for e in got] == [("never-ran", "failed")] and "error" in got[0]


def test_sweep_show_parsing():
    from flows.sweep import experiments_from_show

    shown = [{"rev": "workspace", "experiments": None},
             {"rev": "abc", "name": "master", "experiments": [
                 {"revs": [{"rev": "e1", "name": "s-1", "data": {
                     "metrics": {"metrics.json": {"data": {"mlflow_run_id": "r1", "lr": 0.2}}},
                     "params": {"params.yaml": {"data": {"train": {"lr": 0.2}}}}}, "error": None}]}]}]
    got = experiments_from_show(shown)
    assert got["s-1"]["mlflow_run_ids"] == {"metrics.json:mlflow_run_id": "r1"}
    assert got["s-1"]["params"]["params.yaml"]["train"]["lr"] == 0.2


# ---------------------------------------------------------------------------------------------
# Command lines: bad input is refused before Prefect runs anything


def run_cli(module: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(child_env(), PYTHONPATH=str(ROOT))
    env.pop("PREFECT_API_URL", None)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_serve_cli_refuses_bad_input_and_lists_deployments(toy: Path, tmp_path: Path, capsys):
    from flows import serve

    assert serve.main(["--repo", str(tmp_path), "--dry-run"]) == 2
    assert serve.main(["--repo", str(toy), "--stage", "nope", "--dry-run"]) == 2
    assert serve.main(["--repo", str(toy), "-g", "train.momentum=0.9,0.99", "--dry-run"]) == 2
    assert serve.main(["--repo", str(toy), "--pipeline-cron", "61 * * * *", "--dry-run"]) == 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert serve.main(["--repo", str(toy), "--api-url", f"http://127.0.0.1:{port}/api"]) == 2
    capsys.readouterr()
    assert serve.main(["--repo", str(toy), "--dry-run", "--stage", "train", "--pipeline-cron", "30 1 * * *",
                       "-g", "model=small,big", "--timezone", "Europe/Berlin"]) == 0
    out = capsys.readouterr().out
    assert "deployment d2v-pipeline/scheduled: cron '30 1 * * *' (Europe/Berlin)" in out and "'stages': ['train']" in out
    assert "deployment d2v-retrain/on-change: cron '0 * * * *' (Europe/Berlin)" in out
    assert "deployment d2v-sweep/grid: no schedule" in out and "'grid': {'model': ['small', 'big']}" in out


def test_cli_errors_are_one_clear_line(toy: Path, tmp_path: Path, capsys):
    from flows import pipeline, retrain, sweep

    assert pipeline.main(["--repo", str(toy), "--stage", "nope"]) == 2
    assert "error: unknown stage 'nope'; valid stages: prep@a, prep@b, train, broken" in capsys.readouterr().err
    assert pipeline.main(["--repo", str(tmp_path)]) == 2
    assert "is not a DVC repository" in capsys.readouterr().err
    assert sweep.main(["--repo", str(toy), "-g", "train.nope=1,2"]) == 2
    assert "unknown parameter 'train.nope'" in capsys.readouterr().err
    assert retrain.main(["--repo", str(toy), "--api-url", "http://127.0.0.1:9/api"]) == 2
    assert "Prefect server at http://127.0.0.1:9/api is unreachable" in capsys.readouterr().err
    assert pipeline.main(["--repo", str(toy), "--list"]) == 0
    assert "train                model.txt, metrics.json" in capsys.readouterr().out
    assert report_error(StageTimeoutError("x timed out")) == 1 and report_error(UnknownParamError("bad")) == 2
    assert capsys.readouterr().err == "error: x timed out\nerror: bad\n"


def test_help_texts():
    r = run_cli("flows.serve", "--help", timeout=60)
    assert r.returncode == 0 and "--pipeline-cron" in r.stdout and "prefect deployment run" in r.stdout


@pytest.mark.parametrize("script", ["prefect_server.sh", "serve_flows.sh", "mlflow_ui.sh"])
def test_scripts_source_the_environment_and_bind_loopback(script: str):
    text = (ROOT / "scripts" / script).read_text()
    assert "source scripts/env.sh" in text and os.access(ROOT / "scripts" / script, os.X_OK)
    if script != "serve_flows.sh":
        assert "--host 127.0.0.1" in text


ML_PACKAGES = {"torch", "torchaudio", "torchvision", "d2v", "mlflow", "numpy", "sklearn"}
HELPERS = ("errors", "overrides", "results", "server", "stages", "streaming")  # Prefect-free


def test_flows_hold_no_ml_code():
    """flows/ only orchestrates: no module imports torch, d2v or MLflow, even inside a function."""
    import ast

    assert {p.stem for p in (ROOT / "flows").glob("*.py")} >= set(HELPERS) | {"pipeline", "sweep", "retrain", "serve"}
    for path in (ROOT / "flows").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            bad = [n for n in names if n.split(".")[0] in ML_PACKAGES]
            assert not bad, f"{path.name}:{node.lineno} imports {bad}"


def test_importing_the_flows_loads_no_ml_code_and_the_helpers_no_prefect():
    code = ("import sys\n"
            f"import {', '.join('flows.' + h for h in HELPERS)}\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'prefect', 'dvc'}))\n"
            "import flows.pipeline, flows.sweep, flows.retrain, flows.serve\n"
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({sorted(ML_PACKAGES - {'numpy'})!r})))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(child_env(), PYTHONPATH=str(ROOT)),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:2] == ["[]", "[]"], r.stdout  # helpers: no Prefect/DVC; flows: no torch, d2v, MLflow



# ---------------------------------------------------------------------------------------------
# The real project pipeline through the flow (minutes: downloads, shards, pretraining)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("D2V_FLOW_E2E") != "1",
                    reason="the full pipeline already runs once per test run (test_pipeline.py); "
                           "D2V_FLOW_E2E=1 also runs it through the Prefect flow")
def test_the_project_pipeline_runs_through_the_flow(tmp_path: Path):
    """``run_pipeline`` on a fresh git+DVC copy of the project (a temporary Prefect server)."""
    import mlflow

    from flows.pipeline import run_pipeline

    repo = make_project_repo(tmp_path / "project")
    expected = [s.name for s in list_stages(repo)]
    result = run_pipeline(str(repo), retries=0)
    assert [r["stage"] for r in result["stages"]] == expected
    assert set(result["ran"]) == set(expected)  # a fresh repo: every stage's command ran once
    run_id = json.loads((repo / "reports/metrics/pretrain.json").read_text())["mlflow_run_id"]
    assert result["stages"][expected.index("pretrain")]["mlflow_run_ids"]["reports/metrics/pretrain.json:mlflow_run_id"] == run_id
    assert mlflow.MlflowClient().get_run(run_id).info.status == "FINISHED"  # conftest's throwaway store
    assert run_pipeline(str(repo), stages=["pretrain"], retries=0)["ran"] == []  # up to date
