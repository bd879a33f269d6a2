"""Under load: two fine-tuning experiments queued as users queue them, run two at a time.

A temporary git + DVC repository holds the project's own dvc.yaml, conf/ and src/, with the stages
upstream of fine-tuning already computed (``dvc commit``: a tiny image dataset in real shards, a
tiny pretraining checkpoint whose MLflow run is in the store, placeholders for the speech and text
branches the experiments never touch). Then ``dvc exp run --queue`` of two learning rates with the
target ``register`` (so each runs finetune@image, evaluate@image and register) and a real
``dvc queue start -j 2``: two queue workers, each running its experiment in a DVC temporary folder,
both writing to one MLflow SQLite store and one model registry at the same time.

Both must succeed; the store must hold exactly the runs the experiments report (no run twice, none
missing), each metric once per step, the loss curve of each fine-tuning run equal to what its stage
wrote; the champion alias of each registered model must be on the first version with the best
metric (it moves only for a strict improvement, whichever experiment registers first), and a
further registration with an equal metric must leave it where it is. The race itself (two
registrations read the same champion) is timing-dependent there, so a second, quick test makes four
equal registrations at once, in threads, every time.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import build_cfg, make_project_repo
from test_downstream import make_halves, save_pretrained

BIN = Path(sys.executable).parent
QUEUE_TIMEOUT_S = 600

# The two variants, and the budgets that keep each experiment to seconds: few steps, the image task
# only (the register stage reads finetune.tasks), one thread per stage process (two run at once).
LRS = {"lr-hi": 0.004, "lr-lo": 0.0005}
STEPS = 6
TINY = ["finetune.tasks=[image]", "finetune.threads=1", f"finetune.image.steps={STEPS}",
        "finetune.image.batch_size=16", "finetune.image.warmup_steps=1", "finetune.image.eval_batch_size=40",
        "finetune.image.probe_max_train=60"]
# What `dvc repro` would have computed before the experiments (committed with `dvc commit`).
UPSTREAM = ["download@image", "download@speech", "download@text", "validate@image", "validate@speech",
            "validate@text", "tokenizer", "shard@image", "shard@speech", "shard@text", "pretrain",
            "finetune@speech", "finetune@text", "evaluate@speech", "evaluate@text"]


def env_for(root: Path) -> dict[str, str]:
    return dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", DVC_NO_ANALYTICS="1", DO_NOT_TRACK="true",
                OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MLFLOW_TRACKING_URI=store_uri(root))


def store_uri(root: Path) -> str:
    return f"sqlite:///{root.resolve()}/mlflow.db"


def sh(cmd: list[str], root: Path, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=root, env=env_for(root), capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def dvc(*args: str, root: Path, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    return sh([str(BIN / "dvc"), *args], root, check=check, timeout=timeout)


def fake_upstream(root: Path) -> None:
    """The outputs of the UPSTREAM stages: real ones for the image branch and the pretraining
    checkpoint (with its MLflow run, which `register` logs the encoder into), placeholders where
    the experiments only need a file to exist."""
    from d2v.config import Config

    def put(rel: str, text: str = "{}\n") -> None:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)

    make_halves(root / "data")  # data/raw/image (manifest + PNGs) and data/shards/image
    save_pretrained(Config(seed=1, model=build_cfg("image")), root / "models/pretrain/checkpoint.pt")
    for m in ("speech", "text"):
        put(f"data/raw/{m}/placeholder.txt", m)
        put(f"data/shards/{m}/placeholder.txt", m)
        put(f"models/finetune/{m}/placeholder.txt", m)
        put(f"reports/metrics/finetune_{m}.json")
        put(f"reports/plots/finetune_{m}.tsv", "step\tloss_pretrained\n")
        put(f"reports/metrics/eval_{m}.json")
        put(f"reports/plots/eval_{m}_confusion.png", "placeholder")
    for m in ("image", "speech", "text"):
        put(f"reports/data/download_{m}.json")
        put(f"reports/validation/{m}.json", '{"success": true}\n')
        put(f"reports/data/shard_{m}.json")
    put("models/tokenizer/placeholder.txt", "tokenizer")
    put("reports/data/tokenizer.json")
    put("reports/plots/pretrain_loss.tsv", "step\tmodality\tloss\n")
    put("reports/plots/pretrain_probe.tsv", "train_seconds\taccuracy\n")
    with pytest.MonkeyPatch.context() as mp:  # the pretraining run, in this repo's store
        mp.setenv("MLFLOW_TRACKING_URI", store_uri(root))
        from d2v.tracking.mlflow_utils import Tracker

        tracker = Tracker("pretrain", {"model": "tiny"}, tags={"stage": "pretrain"}, system_metrics=False)
        tracker.finish()
    put("reports/metrics/pretrain.json", json.dumps({"mlflow_run_id": tracker.run_id}) + "\n")


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    import yaml

    from d2v.config import compose_dict

    root = make_project_repo(tmp_path_factory.mktemp("queue") / "repo")
    data = compose_dict(TINY, config_name="pipeline")  # what `dvc exp run -S ...` composes (DVC's Hydra)
    (root / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    (root / ".gitignore").write_text("/mlflow.db\n/mlartifacts/\n/mlflow_spool/\n")
    fake_upstream(root)
    dvc("commit", "-f", "-q", *UPSTREAM, root=root)
    sh(["git", "add", "-A"], root)
    sh(["git", "commit", "-qm", "upstream stages computed"], root)
    return root


def queue_status(root: Path) -> dict[str, str]:
    """``dvc queue status`` as {experiment name: Queued|Running|Success|Failed}."""
    out = dvc("queue", "status", root=root).stdout
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0] != "Task" and parts[-1] in ("Queued", "Running", "Success", "Failed"):
            rows[parts[1]] = parts[-1]
    return rows


def start_queue(root: Path, workers: int) -> None:
    """``dvc queue start -j N``. Its workers are detached but keep the command's stdout and stderr
    open until they exit, so a caller reading those pipes would wait for the whole queue; they go
    to a file instead, and the command itself returns in seconds."""
    with open(root.parent / "queue-start.log", "w") as log:  # outside the repository
        r = subprocess.run([str(BIN / "dvc"), "queue", "start", "-j", str(workers)], cwd=root, env=env_for(root),
                           stdout=log, stderr=subprocess.STDOUT, timeout=120)
    assert r.returncode == 0, (root.parent / "queue-start.log").read_text()


def queue_logs(root: Path, names, chars: int) -> str:
    """The last ``chars`` of each experiment's ``dvc queue logs``, as JSON for a failure message."""
    return json.dumps({n: dvc("queue", "logs", n, root=root, check=False).stdout[-chars:] for n in names}, indent=1)


def exp_refs(root: Path) -> dict[str, str]:
    """The experiments DVC has committed: {name: refs/exps/.../name}."""
    refs = sh(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], root).stdout.split()
    return {r.rsplit("/", 1)[-1]: r for r in refs}


def wait_for_queue(root: Path, names: set[str]) -> dict[str, str]:
    """Wait until every experiment is done; then their ``dvc queue status``. Polls the experiments'
    git refs (a DVC command costs a second of CPU, on the cores the experiments need) and the queue
    status only now and then, to see a failed experiment early; kills them after QUEUE_TIMEOUT_S."""
    t0 = last = time.monotonic()
    while True:
        done = names <= set(exp_refs(root))
        if done or time.monotonic() - last > 45:
            states, last = queue_status(root), time.monotonic()
            if states and all(s in ("Success", "Failed") for s in states.values()):
                return states
        if time.monotonic() - t0 > QUEUE_TIMEOUT_S:
            states = queue_status(root)
            logs = queue_logs(root, names, 3000)
            dvc("queue", "kill", *names, root=root, check=False)  # the idle workers then exit by themselves
            pytest.fail(f"the queue did not finish in {QUEUE_TIMEOUT_S} s: {states}; logs: {logs}")
        time.sleep(1)


def read_rev(root: Path, rev: str, path: str) -> str:
    return sh(["git", "show", f"{rev}:{path}"], root).stdout


@pytest.mark.slow  # ~75-90 s on an idle 2-core machine (~130 CPU-s: 7 stage processes, 2 queue workers)
def test_two_queued_experiments_run_at_once_and_log_every_metric_once(repo: Path):
    from mlflow.tracking import MlflowClient

    for name, lr in LRS.items():
        dvc("exp", "run", "--queue", "-n", name, *[a for o in TINY for a in ("-S", o)], "-S",
            f"finetune.image.lr={lr}", "register", root=repo)
    start_queue(repo, workers=2)  # two workers; each stops once the queue is empty
    states = wait_for_queue(repo, set(LRS))
    if states != {n: "Success" for n in LRS}:
        pytest.fail(f"queue status {states}; logs: {queue_logs(repo, LRS, 4000)}")

    # The experiments' results, as committed by DVC (refs/exps/.../<name>)
    revs = {n: r for n, r in exp_refs(repo).items() if n in LRS}
    assert set(revs) == set(LRS), revs
    fin = {n: json.loads(read_rev(repo, r, "reports/metrics/finetune_image.json")) for n, r in revs.items()}
    ev = {n: json.loads(read_rev(repo, r, "reports/metrics/eval_image.json")) for n, r in revs.items()}
    reg = {n: json.loads(read_rev(repo, r, "reports/metrics/register.json"))["registrations"] for n, r in revs.items()}
    params = {n: yaml_load(read_rev(repo, r, "params.yaml")) for n, r in revs.items()}
    assert {n: p["finetune"]["image"]["lr"] for n, p in params.items()} == LRS

    # 1. The store holds exactly the runs the stages report: the pretraining run and, per
    #    experiment, two fine-tuning runs and one evaluation run (no stage upstream of the image
    #    branch ran again: it would have logged a run too); all finished.
    client = MlflowClient(tracking_uri=store_uri(repo), registry_uri=store_uri(repo))
    runs = client.search_runs([client.get_experiment_by_name("d2v").experiment_id], max_results=1000)
    pre_id = json.loads((repo / "reports/metrics/pretrain.json").read_text())["mlflow_run_id"]
    want = {pre_id} | {rid for n in LRS for rid in (fin[n]["mlflow_run_id"], fin[n]["baseline_mlflow_run_id"],
                                                     ev[n]["mlflow_run_id"])}
    assert len(want) == 1 + 3 * len(LRS)
    assert sorted(r.info.run_id for r in runs) == sorted(want)  # none twice, none missing
    assert all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    # ... and the two experiments did run at once: from fine-tuning to evaluation, their runs overlap
    spans = {n: [(r.info.start_time, r.info.end_time) for r in runs
                 if r.info.run_id in (fin[n]["mlflow_run_id"], fin[n]["baseline_mlflow_run_id"], ev[n]["mlflow_run_id"])]
             for n in LRS}
    (a0, a1), (b0, b1) = ((min(s for s, _ in v), max(e for _, e in v)) for v in spans.values())
    assert a0 < b1 and b0 < a1, f"the two experiments never ran at once: {spans}"

    # 2. Every metric once per step; the loss curves are the ones the stages wrote, step by step.
    for n in LRS:
        tsv = list(csv.DictReader(io.StringIO(read_rev(repo, revs[n], "reports/plots/finetune_image.tsv")),
                                  delimiter="\t"))
        for rid, init in ((fin[n]["mlflow_run_id"], "pretrained"), (fin[n]["baseline_mlflow_run_id"], "random")):
            run = client.get_run(rid)
            assert run.data.params["finetune.image.lr"] == str(LRS[n])
            for key in run.data.metrics:
                steps = Counter(m.step for m in client.get_metric_history(rid, key))
                assert all(c == 1 for c in steps.values()), (n, init, key, steps)
            hist = sorted(client.get_metric_history(rid, "train_loss"), key=lambda m: m.step)
            assert [m.step for m in hist] == list(range(1, STEPS + 1)), (n, init)
            assert [round(m.value, 5) for m in hist] == [float(row[f"loss_{init}"]) for row in tsv], (n, init)
            assert [m.step for m in client.get_metric_history(rid, "lr")] == list(range(1, STEPS + 1))
            acc = fin[n]["val_accuracy" if init == "pretrained" else "baseline_val_accuracy"]
            assert [(m.step, m.value) for m in client.get_metric_history(rid, "val_accuracy")] == [(STEPS, acc)]
            test_acc = ev[n]["accuracy" if init == "pretrained" else "baseline_accuracy"]
            assert [m.value for m in client.get_metric_history(rid, "test_accuracy")] == [test_acc]
        for key in ("accuracy", "baseline_accuracy", "probe_accuracy", "probe_baseline_accuracy"):
            assert [(m.step, m.value) for m in client.get_metric_history(ev[n]["mlflow_run_id"], key)] == [(0, ev[n][key])]

    # 3. The registry: each name has one version per experiment; the champion is the first version
    #    with the best metric (the alias moved only for a strict improvement, in whichever order
    #    the two register stages ran), as each stage's own report says.
    for name in ("d2v-image-classifier", "d2v-encoder"):
        versions = sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
        assert [str(v.version) for v in versions] == ["1", "2"], (name, versions)
        values = [float(v.tags["metric_value"]) for v in versions]
        best = str(versions[values.index(max(values))].version)  # index(): the first of equals
        champ = str(client.get_model_version_by_alias(name, "champion").version)
        assert champ == best, (name, values, champ)
        by_stage = {r["version"]: r for n in LRS for r in reg[n] if r["name"] == name}
        assert set(by_stage) == {"1", "2"}
        first, second = by_stage["1"], by_stage["2"]
        assert first["promoted"] and first["previous_champion"] is None, first  # v1 was the first registration
        assert second["previous_champion"] == "1" and second["promoted"] == (second["value"] > first["value"]), second

    # An equal metric, registered now, leaves the alias where it is; a strictly better one moves it.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", store_uri(repo))
        from d2v.tracking import registry

        name = "d2v-image-classifier"
        champ = client.get_model_version_by_alias(name, "champion")
        value, source, run_id = float(champ.tags["metric_value"]), champ.source, champ.run_id
        tie = registry.register_version(registry.client(), name, source, run_id, "test_accuracy", value)
        assert not tie.promoted and tie.previous_champion == str(champ.version)
        assert str(client.get_model_version_by_alias(name, "champion").version) == str(champ.version)
        up = registry.register_version(registry.client(), name, source, run_id, "test_accuracy", value + 0.01)
        assert up.promoted and str(client.get_model_version_by_alias(name, "champion").version) == up.version


def yaml_load(text: str) -> dict:
    import yaml

    return yaml.safe_load(text)


def test_concurrent_registrations_of_equal_models_keep_the_first_champion(tmp_path: Path):
    """Four registrations of one model with the same metric at once (the register stages of four
    queued experiments): each gets its own version, the first takes the alias and no tie moves it,
    and none fails on the registered model another one created a moment before."""
    import threading

    from d2v.tracking import registry
    from d2v.tracking.mlflow_utils import Tracker

    tracker = Tracker("register-race", {"a": 1}, system_metrics=False)
    tracker.finish()
    name = f"race-{tmp_path.name}"
    barrier, results, errors = threading.Barrier(4), {}, []

    def register(i: int) -> None:
        cl = registry.client()
        barrier.wait()
        try:
            results[i] = registry.register_version(cl, name, f"runs:/{tracker.run_id}/m", tracker.run_id,
                                                   "test_accuracy", 0.5)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=register, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    regs = sorted(results.values(), key=lambda r: int(r.version))
    assert [r.version for r in regs] == ["1", "2", "3", "4"]
    assert [r.promoted for r in regs] == [True, False, False, False], regs
    assert [r.previous_champion for r in regs] == [None, "1", "1", "1"], regs
    assert str(registry.champion(registry.client(), name).version) == "1"
