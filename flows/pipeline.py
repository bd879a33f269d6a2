"""The pipeline flow: each DVC stage is a Prefect task running ``dvc repro <stage>``.

Stages run one after the other in pipeline order (upstream first), each with retries and a
timeout; every output line of DVC and the stage is sent to the run's log. The result lists
the stages that ran, their outputs and the MLflow run ids found in their JSON outputs.

With ``experiment`` or ``overrides`` the run is a DVC experiment: params.yaml is composed with
the overrides as ``dvc exp run -S ...`` would, the stages run, and ``dvc exp save`` records the
experiment (see ``dvc exp show``). Without them it is a plain ``dvc repro`` of the workspace.

Command line (one run, against PREFECT_API_URL or a temporary server)::

    python -m flows.pipeline --stage pretrain --experiment tiny -S train.max_steps=20
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from flows.errors import CLI_ERRORS, FlowInputError, UnknownStageError, report_error
from flows.overrides import apply_params, experiment_overrides
from flows.results import collect_run_ids, publish
from flows.server import prefect_api
from flows.stages import StageInfo, check_repo, list_stages, require_git, select_stages
from flows.streaming import child_env, dvc_exe, prefect_env, run_log, run_streaming

DEFAULT_STAGE_TIMEOUT_S = 6 * 3600.0
DEFAULT_RETRIES = 1
DEFAULT_RETRY_DELAY_S = 30.0


@task(name="dvc-repro", task_run_name="dvc repro {stage}", cache_policy=NONE)
def run_stage(repo: str, stage: str, outs: list[str] | None = None, force: bool = False,
              timeout_s: float | None = DEFAULT_STAGE_TIMEOUT_S) -> dict[str, Any]:
    """``dvc repro <stage>`` (``--force --single-item`` with ``force``), output streamed to the log.

    Returns ``{stage, ran, ran_stages, restored_stages, seconds, outs, mlflow_run_ids}`` (``ran``:
    the stage's command ran; ``restored_stages``: outputs taken from DVC's run cache instead of
    running, because these exact deps and params ran before); a non-zero exit raises
    StageFailedError (StageTimeoutError past ``timeout_s``) carrying the last output lines.
    """
    root = Path(repo)
    cmd = [dvc_exe(), "repro", *(["--force", "--single-item"] if force else []), stage]
    log = run_log()
    log(logging.INFO, f"$ {' '.join(['dvc', *cmd[1:]])}  (in {root}, timeout {timeout_s or 'none'} s)")
    res = run_streaming(cmd, root, log, timeout=timeout_s, env=child_env(prefect_env()))
    res.raise_on_failure(f"stage '{stage}' (dvc repro {stage})")
    outs = list(outs or [])
    return {
        "stage": stage,
        "ran": stage in res.ran_stages,
        "ran_stages": res.ran_stages,
        "restored_stages": res.restored_stages,
        "seconds": round(res.seconds, 2),
        "outs": outs,
        "mlflow_run_ids": collect_run_ids(root, outs),
    }


@task(name="compose-params", task_run_name="set params: {overrides}", cache_policy=NONE)
def compose_params(repo: str, overrides: list[str]) -> list[str]:
    """Write the experiment's overrides into params.yaml the way ``dvc exp run -S`` does."""
    written = apply_params(Path(repo), overrides)
    run_log()(logging.INFO, f"composed {', '.join(written)} with overrides {overrides}")
    return written


@task(name="dvc-exp-save", task_run_name="dvc exp save -n {name}", cache_policy=NONE)
def save_experiment(repo: str, name: str, stages: list[str] | None = None, timeout_s: float = 600) -> str:
    """``dvc exp save -n <name> [stages]``: record the workspace (params, dvc.lock, metrics) as a
    DVC experiment, caching the outputs of ``stages`` (the ones this run reproduced)."""
    cmd = [dvc_exe(), "exp", "save", "-n", name, *(stages or [])]
    run_streaming(cmd, Path(repo), run_log(), timeout=timeout_s).raise_on_failure(f"dvc exp save -n {name}")
    return name


def stage_timeouts(names: list[str], default_s: float | None, per_stage: dict[str, float] | None,
                   stages: list[StageInfo]) -> dict[str, float | None]:
    """Timeout per stage: ``per_stage`` keyed by stage or group name (``shard``), else the default."""
    per_stage = dict(per_stage or {})
    valid = {s.name for s in stages} | {s.group for s in stages}
    bad = sorted(k for k in per_stage if k not in valid)
    if bad:
        raise UnknownStageError(f"stage_timeouts names unknown stage(s) {bad}; valid: {', '.join(sorted(valid))}")
    group = {s.name: s.group for s in stages}
    return {n: per_stage.get(n, per_stage.get(group[n], default_s)) for n in names}


def default_exp_name(experiment: str | None) -> str:
    base = re.sub(r"[^A-Za-z0-9_-]+", "-", experiment or "exp").strip("-") or "exp"
    return f"{base}-{time.strftime('%Y%m%d-%H%M%S')}"


def results_markdown(summary: dict[str, Any]) -> str:
    """The run's results as a Markdown table (a Prefect artifact in the UI)."""
    lines = [f"# d2v pipeline: {summary['repo']}", ""]
    if summary.get("dvc_experiment"):
        lines += [f"DVC experiment **{summary['dvc_experiment']}** (overrides: `{' '.join(summary['overrides'])}`); "
                  "compare with `dvc exp show`.", ""]
    lines += ["| stage | ran | seconds | outputs | MLflow run ids |", "|---|---|---|---|---|"]
    for r in summary["stages"]:
        ids = "<br>".join(f"`{v}` ({k})" for k, v in r["mlflow_run_ids"].items()) or "-"
        outs = "<br>".join(f"`{o}`" for o in r["outs"]) or "-"
        how = "yes" if r["ran"] else "from run cache" if r["stage"] in r["restored_stages"] else "up to date"
        lines.append(f"| {r['stage']} | {how} | {r['seconds']} | {outs} | {ids} |")
    lines += ["", "Find the runs in `mlflow ui` (scripts/mlflow_ui.sh): experiment `d2v`, or search "
              "`attributes.run_id = '<id>'`."]
    return "\n".join(lines)


@flow(name="d2v-pipeline", description="Run DVC stages (dvc repro) as tasks; optional experiment overrides.")
def pipeline_flow(
    repo: str | None = None,
    stages: list[str] | None = None,
    experiment: str | None = None,
    overrides: list[str] | None = None,
    exp_name: str | None = None,
    force: bool = False,
    retries: int = DEFAULT_RETRIES,
    retry_delay_seconds: float = DEFAULT_RETRY_DELAY_S,
    stage_timeout_seconds: float | None = DEFAULT_STAGE_TIMEOUT_S,
    stage_timeouts_seconds: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Run the selected DVC stages (all by default) in pipeline order, one task each.

    Args:
        repo: the DVC repository root (default: this project).
        stages: stage names (``pretrain``, ``shard@image``) or foreach groups (``shard``).
        experiment: a Hydra experiment (``conf/experiment/<name>.yaml``), i.e. ``-S experiment=<name>``.
        overrides: more ``-S`` overrides (``train.lr=5e-4``); with ``experiment`` they make the run
            a DVC experiment, saved as ``exp_name`` (default ``<experiment>-<timestamp>``).
        force: rerun the selected stages even if nothing changed (``dvc repro -f -s``).
        retries, retry_delay_seconds: Prefect retries of a failed stage.
        stage_timeout_seconds: timeout of each stage (the command is killed after it).
        stage_timeouts_seconds: per-stage timeouts keyed by stage or group name.

    Returns:
        ``{repo, stages: [{stage, ran, seconds, outs, mlflow_run_ids, ...}], ran, restored, outs,
        mlflow_run_ids, experiment, overrides, dvc_experiment}``.
    """
    log = get_run_logger()
    root, infos, names, ovs = _checked_args(repo, stages, experiment, overrides)
    timeouts = stage_timeouts(names, stage_timeout_seconds, stage_timeouts_seconds, infos)
    log.info(f"repo {root}: stages {', '.join(names)}" + (f"; overrides {ovs}" if ovs else " (plain dvc repro)"))
    outs = {s.name: list(s.outs) for s in infos}
    stage_task = run_stage.with_options(retries=retries, retry_delay_seconds=retry_delay_seconds)
    if ovs:
        compose_params(str(root), ovs)
    results = [stage_task(str(root), n, outs=outs[n], force=force, timeout_s=timeouts[n]) for n in names]
    saved = save_experiment(str(root), exp_name or default_exp_name(experiment), names) if ovs else None
    run_ids = sorted({v for r in results for v in r["mlflow_run_ids"].values()})
    summary = {
        "repo": str(root),
        "stages": results,
        "ran": [s for r in results for s in r["ran_stages"]],
        "restored": [s for r in results for s in r["restored_stages"]],
        "outs": {r["stage"]: r["outs"] for r in results},
        "mlflow_run_ids": run_ids,
        "experiment": experiment,
        "overrides": ovs,
        "dvc_experiment": saved,
    }
    publish(summary, "d2v-pipeline", results_markdown(summary))
    restored = f"; restored from the run cache: {summary['restored']}" if summary["restored"] else ""
    log.info(f"done: ran {summary['ran'] or 'nothing'}{restored}; MLflow run ids {run_ids or '-'}")
    return summary


def validate_pipeline_args(repo: str | None, stages: list[str] | None, experiment: str | None = None,
                           overrides: list[str] | None = None) -> tuple[Path, list[str], list[str]]:
    """The checks the flow makes first, without Prefect: (repo root, stage names, overrides)."""
    root, _, names, ovs = _checked_args(repo, stages, experiment, overrides)
    return root, names, ovs


def _checked_args(repo: str | None, stages: list[str] | None, experiment: str | None,
                  overrides: list[str] | None) -> tuple[Path, list[StageInfo], list[str], list[str]]:
    """(repo root, all stages, the selected names, the validated overrides); git is required with overrides."""
    root, infos, names = select_stages(repo, stages)
    ovs = experiment_overrides(root, experiment, overrides)
    if ovs:
        require_git(root)
    return root, infos, names, ovs


def run_pipeline(repo: str | None = None, stages: list[str] | None = None, *, api_url: str | None = None,
                 **kwargs: Any) -> dict[str, Any]:
    """Validate, then run ``pipeline_flow`` once and return its result.

    Runs against ``api_url`` or PREFECT_API_URL (checked first: ServerUnreachableError if it does
    not answer), else in a temporary Prefect server that lives as long as this process. Keyword
    arguments go to ``pipeline_flow`` (``experiment``, ``overrides``, ``force``, ``retries`` ...).
    """
    validate_pipeline_args(repo, stages, kwargs.get("experiment"), kwargs.get("overrides"))
    with prefect_api(api_url):
        return pipeline_flow(repo=repo, stages=stages, **kwargs)


def _parse_timeouts(items: list[str]) -> dict[str, float]:
    out = {}
    for it in items:
        name, sep, val = it.partition("=")
        try:
            out[name.strip()] = float(val)
        except ValueError:
            sep = ""
        if not sep:
            raise FlowInputError(f"bad --stage-timeout {it!r}: expected STAGE=SECONDS (e.g. pretrain=7200)")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m flows.pipeline",
        description="Run the DVC pipeline once as a Prefect flow (stages as tasks, output in the run log).",
        epilog="Examples:\n  python -m flows.pipeline --list\n  python -m flows.pipeline --stage shard --stage pretrain\n"
               "  python -m flows.pipeline --experiment tiny -S train.lr=5e-4 --name tiny-lr5e-4\n\n"
               "Against the server from scripts/prefect_server.sh: --api-url http://127.0.0.1:4200/api "
               "(or PREFECT_API_URL); without either, Prefect starts a temporary server for this run.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--repo", default=None, help="DVC repository root (default: this project)")
    p.add_argument("--stage", action="append", default=[], metavar="NAME",
                   help="stage or foreach group to run (repeatable; default: all)")
    p.add_argument("--experiment", default=None, help="Hydra experiment (conf/experiment/<name>.yaml)")
    p.add_argument("-S", "--set-param", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="params override as in `dvc exp run -S` (repeatable); makes the run a DVC experiment")
    p.add_argument("--name", dest="exp_name", default=None, help="DVC experiment name (with --experiment/-S)")
    p.add_argument("--force", action="store_true", help="rerun the selected stages even if unchanged")
    p.add_argument("--retries", type=int, default=DEFAULT_RETRIES, help="retries of a failed stage (default: %(default)s)")
    p.add_argument("--retry-delay", type=float, default=DEFAULT_RETRY_DELAY_S, help="seconds between retries")
    p.add_argument("--timeout", type=float, default=DEFAULT_STAGE_TIMEOUT_S, help="timeout per stage in seconds")
    p.add_argument("--stage-timeout", action="append", default=[], metavar="STAGE=SECONDS",
                   help="timeout for one stage or group (repeatable)")
    p.add_argument("--api-url", default=None, help="Prefect API URL (default: PREFECT_API_URL, else a temporary server)")
    p.add_argument("--list", action="store_true", help="list the stages and their outputs, then exit")
    return p


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        if ns.list:
            for s in list_stages(check_repo(ns.repo)):
                print(f"{s.name:<20} {', '.join(s.outs)}")
            return 0
        result = run_pipeline(ns.repo, ns.stage or None, api_url=ns.api_url, experiment=ns.experiment,
                              overrides=ns.overrides, exp_name=ns.exp_name, force=ns.force, retries=ns.retries,
                              retry_delay_seconds=ns.retry_delay, stage_timeout_seconds=ns.timeout,
                              stage_timeouts_seconds=_parse_timeouts(ns.stage_timeout) or None)
    except CLI_ERRORS as e:
        return report_error(e)
    print(f"ran: {', '.join(result['ran']) or 'nothing (up to date)'}")
    for r in result["stages"]:
        for k, v in r["mlflow_run_ids"].items():
            print(f"mlflow run {v}  ({k})")
    if result["dvc_experiment"]:
        print(f"DVC experiment: {result['dvc_experiment']} (dvc exp show)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
