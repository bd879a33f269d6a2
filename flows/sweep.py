"""The experiment-sweep flow: queue ``dvc exp run --queue -S ...`` over a grid, run the queue.

Every combination of the grid becomes one queued DVC experiment named ``<prefix>-<i>``; then
``dvc exp run --run-all`` runs the queue (in DVC's temporary folders, so the workspace is left
alone) with its output streamed into the run's log. Keys are checked against params.yaml and the
Hydra config groups before anything is queued. Compare the results with ``dvc exp show`` and,
for the MLflow runs the stages log, in ``mlflow ui``.

Command line::

    python -m flows.sweep -g train.lr=1e-4,5e-4 -g model.depth=2,4 --experiment tiny
    python -m flows.sweep --preset glue --experiment text_base     # the GLUE learning-rate grid

Presets (:data:`PRESETS`) are the grids the paper's recipes prescribe: ``glue`` is the learning-rate
sweep data2vec 2.0's README asks for on each GLUE task (fairseq ``cfg/text_finetuning``: lr in
{1e-5, 2e-5, 4e-5, 6e-5}), over the text fine-tuning and evaluation stages only.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from flows.errors import CLI_ERRORS, StageFailedError, report_error
from flows.overrides import experiment_overrides, grid_overrides, parse_grid_arg, validate_overrides
from flows.results import find_run_ids, publish
from flows.server import prefect_api
from flows.stages import check_repo, list_stages, require_git, resolve_stages
from flows.streaming import dvc_exe, run_dvc, run_log, run_streaming

DEFAULT_GRID: dict[str, list[Any]] = {"train.lr": [1e-4, 5e-4]}
PRESETS: dict[str, dict[str, Any]] = {
    "glue": {"grid": {"finetune.text.lr": [1e-5, 2e-5, 4e-5, 6e-5]}, "stages": ["finetune@text", "evaluate@text"],
             "help": "data2vec 2.0's GLUE grid: finetune.text.lr in {1e-5, 2e-5, 4e-5, 6e-5}; text stages only"},
}
DEFAULT_SWEEP_TIMEOUT_S = 12 * 3600.0


@task(name="dvc-exp-queue", task_run_name="queue {name}", cache_policy=NONE)
def queue_experiment(repo: str, name: str, overrides: list[str], targets: list[str] | None = None) -> str:
    """``dvc exp run --queue -n <name> -S k=v ... [targets]``; returns the experiment name."""
    cmd = [dvc_exe(), "exp", "run", "--queue", "-n", name]
    for o in overrides:
        cmd += ["-S", o]
    cmd += list(targets or [])
    run_streaming(cmd, Path(repo), run_log(), timeout=600).raise_on_failure(f"queueing experiment '{name}'")
    return name


@task(name="dvc-exp-run-all", task_run_name="dvc exp run --run-all -j {jobs}", cache_policy=NONE)
def run_queue(repo: str, names: list[str], jobs: int = 1, timeout_s: float | None = DEFAULT_SWEEP_TIMEOUT_S) -> float:
    """``dvc exp run --run-all -j <jobs>``: run the queue, following each experiment's output.

    On a timeout the sweep's experiments are killed (``dvc queue kill``). Returns the seconds taken.
    """
    root = Path(repo)
    res = run_streaming([dvc_exe(), "exp", "run", "--run-all", "-j", str(jobs)], root, run_log(), timeout=timeout_s)
    if res.timed_out:
        run_dvc(["queue", "kill", *names], root, timeout=120)  # the sweep's experiments only
    res.raise_on_failure("dvc exp run --run-all")
    return round(res.seconds, 2)


def experiments_from_show(shown: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``dvc exp show --json`` as ``{name: {rev, params, metrics, mlflow_run_ids}}``."""
    out: dict[str, dict[str, Any]] = {}
    for baseline in shown:
        for group in baseline.get("experiments") or []:
            for rev in group.get("revs") or []:
                name = rev.get("name")
                data = rev.get("data") or {}
                if not name:
                    continue
                metrics = {f: (v or {}).get("data", {}) for f, v in (data.get("metrics") or {}).items()}
                params = {f: (v or {}).get("data", {}) for f, v in (data.get("params") or {}).items()}
                ids = {f"{f}:{k}": v for f, m in metrics.items() for k, v in find_run_ids(m).items()}
                out[name] = {"rev": rev.get("rev"), "params": params, "metrics": metrics, "mlflow_run_ids": ids,
                             "error": rev.get("error")}
    return out


@task(name="dvc-exp-show", task_run_name="collect {names}", cache_policy=NONE)
def collect_experiments(repo: str, names: list[str]) -> list[dict[str, Any]]:
    """Each sweep experiment's status, metrics and MLflow run ids (from ``dvc exp show --json``);
    a failed one gets the tail of ``dvc queue logs``."""
    root = Path(repo)
    r = run_dvc(["exp", "show", "--json"], root, timeout=600)
    if r.returncode != 0:
        raise StageFailedError(f"dvc exp show failed: {r.stderr.strip()}")
    found = experiments_from_show(json.loads(r.stdout[r.stdout.find("["):] or "[]"))
    log = run_log()
    results = []
    for n in names:
        if n in found and not found[n].get("error"):
            results.append({"name": n, "status": "success", **{k: found[n][k] for k in ("rev", "metrics", "mlflow_run_ids")}})
            continue
        logs = run_dvc(["queue", "logs", n], root, timeout=120)
        tail = (logs.stdout + logs.stderr).strip().splitlines()[-15:]
        for line in tail:
            log(logging.ERROR, f"[{n}] {line}")
        results.append({"name": n, "status": "failed", "error": "\n".join(tail)})
    return results


@flow(name="d2v-sweep", description="Queue dvc exp run -S over a parameter grid and run the queue.")
def sweep_flow(
    repo: str | None = None,
    grid: dict[str, list[Any]] | None = None,
    experiment: str | None = None,
    overrides: list[str] | None = None,
    stages: list[str] | None = None,
    name_prefix: str | None = None,
    jobs: int = 1,
    timeout_seconds: float | None = DEFAULT_SWEEP_TIMEOUT_S,
) -> dict[str, Any]:
    """Queue one DVC experiment per grid combination, run the queue, report each experiment.

    Args:
        repo: the DVC repository root (a git repository; default: this project).
        grid: ``{"train.lr": [1e-4, 5e-4], "experiment": ["image_base", "text_base"]}``: params.yaml
            keys (dotted) or Hydra config groups, each with its values (default: DEFAULT_GRID).
        experiment, overrides: fixed ``-S`` settings shared by every combination.
        stages: stages to run (default: the whole pipeline).
        name_prefix: experiments are named ``<prefix>-1`` ... (default ``sweep-<timestamp>``).
        jobs: experiments run in parallel (``-j``).
        timeout_seconds: for the whole queue run; the sweep's experiments are killed after it.

    Returns:
        ``{repo, experiments: [{name, overrides, status, metrics, mlflow_run_ids}], failed}``;
        raises StageFailedError when an experiment failed (after reporting all of them).
    """
    log = get_run_logger()
    root, combos, base, targets = validate_sweep_args(repo, grid, experiment, overrides, stages)
    prefix = name_prefix or f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    names = [f"{prefix}-{i + 1}" for i in range(len(combos))]
    log.info(f"queueing {len(combos)} experiment(s) in {root}: " + "; ".join(f"{n}: {' '.join(c)}" for n, c in zip(names, combos)))
    for n, combo in zip(names, combos):
        queue_experiment(str(root), n, base + combo, targets)
    run_queue(str(root), names, jobs=jobs, timeout_s=timeout_seconds)
    exps = collect_experiments(str(root), names)
    for e, combo in zip(exps, combos):
        e["overrides"] = base + combo
    failed = [e["name"] for e in exps if e["status"] != "success"]
    summary = {"repo": str(root), "experiments": exps, "failed": failed}
    md = ["# d2v sweep", "", "| experiment | overrides | status | MLflow run ids |", "|---|---|---|---|"]
    for e in exps:
        ids = "<br>".join(f"`{v}`" for v in e.get("mlflow_run_ids", {}).values()) or "-"
        md.append(f"| {e['name']} | `{' '.join(e['overrides'])}` | {e['status']} | {ids} |")
    md += ["", "Compare: `dvc exp show`, or select the runs in `mlflow ui` and press Compare."]
    publish(summary, "d2v-sweep", "\n".join(md))
    if failed:
        raise StageFailedError(f"sweep experiment(s) failed: {', '.join(failed)} (see `dvc queue logs <name>`)")
    return summary


def validate_sweep_args(repo: str | None, grid: dict[str, list[Any]] | None, experiment: str | None = None,
                        overrides: list[str] | None = None, stages: list[str] | None = None,
                        ) -> tuple[Path, list[list[str]], list[str], list[str]]:
    """(repo root, grid combinations as ``-S`` lists, shared overrides, stage targets), or a clear error."""
    root = check_repo(repo)
    require_git(root)
    combos = grid_overrides(grid if grid is not None else DEFAULT_GRID)
    base = experiment_overrides(root, experiment, overrides)
    seen: set[str] = set()
    for combo in combos:
        validate_overrides(root, [c for c in combo if c not in seen])
        seen.update(combo)
    targets = resolve_stages(stages, list_stages(root)) if stages else []
    return root, combos, base, targets


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m flows.sweep",
        description="Queue a grid of DVC experiments (dvc exp run --queue -S ...) and run the queue, as a Prefect flow.",
        epilog="Example:\n  python -m flows.sweep -g train.lr=1e-4,5e-4 -g experiment=image_base,text_base -j 1\n\n"
               "Then: dvc exp show (or mlflow ui) to compare.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--repo", default=None, help="DVC repository root, a git repo (default: this project)")
    p.add_argument("-g", "--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help=f"one grid axis (repeatable; default: {DEFAULT_GRID})")
    p.add_argument("--experiment", default=None, help="Hydra experiment shared by all combinations")
    p.add_argument("-S", "--set-param", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override shared by all combinations (repeatable)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a named grid (and its stages): " + "; ".join(f"{k}: {v['help']}" for k, v in PRESETS.items()))
    p.add_argument("--stage", action="append", default=[], metavar="NAME", help="stages to run (default: all)")
    p.add_argument("--prefix", default=None, help="experiment names <prefix>-1, ... (default: sweep-<time>)")
    p.add_argument("-j", "--jobs", type=int, default=1, help="experiments in parallel (default: 1)")
    p.add_argument("--timeout", type=float, default=DEFAULT_SWEEP_TIMEOUT_S, help="timeout of the queue run, seconds")
    p.add_argument("--api-url", default=None, help="Prefect API URL (default: PREFECT_API_URL, else a temporary server)")
    return p


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    if ns.preset:  # the preset's grid and stages: -g axes are added to its grid, --stage replaces its stages
        preset = PRESETS[ns.preset]
        ns.stage = ns.stage or list(preset["stages"])
        ns.grid = [f"{k}={','.join(map(str, v))}" for k, v in preset["grid"].items()] + ns.grid
    try:
        grid = parse_grid_arg(ns.grid) if ns.grid else None
        validate_sweep_args(ns.repo, grid, ns.experiment, ns.overrides, ns.stage or None)
        with prefect_api(ns.api_url):
            result = sweep_flow(repo=ns.repo, grid=grid, experiment=ns.experiment, overrides=ns.overrides,
                                stages=ns.stage or None, name_prefix=ns.prefix, jobs=ns.jobs, timeout_seconds=ns.timeout)
    except CLI_ERRORS as e:
        return report_error(e)
    for e in result["experiments"]:
        print(f"{e['name']}: {e['status']}  {' '.join(e['overrides'])}  {' '.join(e['mlflow_run_ids'].values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
