"""The retrain flow: run the pipeline only when ``dvc status`` says something changed.

``dvc status`` compares the workspace with dvc.lock: changed data or code (deps), changed
params, changed or missing outputs, a changed command. When it reports nothing the flow ends
at once ("up to date"); otherwise it runs ``pipeline_flow`` (as a subflow) for the selected
stages, and ``dvc repro`` reruns just the stages affected.

Command line::

    python -m flows.retrain --stage pretrain
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from flows.errors import CLI_ERRORS, report_error
from flows.pipeline import DEFAULT_RETRIES, DEFAULT_RETRY_DELAY_S, DEFAULT_STAGE_TIMEOUT_S, pipeline_flow
from flows.server import prefect_api
from flows.stages import dvc_status, select_stages
from flows.streaming import run_log


@task(name="dvc-status", task_run_name="dvc status", cache_policy=NONE)
def check_changes(repo: str, targets: list[str] | None = None) -> dict[str, list[str]]:
    """``dvc status`` for the targets (and their upstream stages): ``{stage: [reasons]}``."""
    import logging

    changes = dvc_status(Path(repo), targets or [])
    log = run_log()
    for stage, reasons in changes.items():
        log(logging.INFO, f"{stage}: {'; '.join(reasons)}")
    if not changes:
        log(logging.INFO, "dvc status: data and pipelines are up to date")
    return changes


@flow(name="d2v-retrain", description="Run the pipeline when dvc status reports changed data, params or code.")
def retrain_flow(
    repo: str | None = None,
    stages: list[str] | None = None,
    retries: int = DEFAULT_RETRIES,
    retry_delay_seconds: float = DEFAULT_RETRY_DELAY_S,
    stage_timeout_seconds: float | None = DEFAULT_STAGE_TIMEOUT_S,
    stage_timeouts_seconds: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Check ``dvc status``; if anything changed, run ``pipeline_flow`` for ``stages`` (default: all).

    Returns ``{repo, ran: bool, changes: {stage: [reasons]}, pipeline: <pipeline_flow result> | None}``.
    """
    log = get_run_logger()
    root, _, names = select_stages(repo, stages)
    targets = names if stages else []
    changes = check_changes(str(root), targets)
    if not changes:
        log.info("nothing changed since the last run: not retraining")
        return {"repo": str(root), "ran": False, "changes": {}, "pipeline": None}
    log.info(f"changed: {', '.join(changes)}; running the pipeline")
    result = pipeline_flow(repo=str(root), stages=stages, retries=retries, retry_delay_seconds=retry_delay_seconds,
                           stage_timeout_seconds=stage_timeout_seconds, stage_timeouts_seconds=stage_timeouts_seconds)
    return {"repo": str(root), "ran": True, "changes": changes, "pipeline": result}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m flows.retrain",
        description="Run the DVC pipeline as a Prefect flow only if `dvc status` reports changes.",
    )
    p.add_argument("--repo", default=None, help="DVC repository root (default: this project)")
    p.add_argument("--stage", action="append", default=[], metavar="NAME", help="stages to check and run (default: all)")
    p.add_argument("--retries", type=int, default=DEFAULT_RETRIES, help="retries of a failed stage")
    p.add_argument("--timeout", type=float, default=DEFAULT_STAGE_TIMEOUT_S, help="timeout per stage in seconds")
    p.add_argument("--api-url", default=None, help="Prefect API URL (default: PREFECT_API_URL, else a temporary server)")
    ns = p.parse_args(argv)
    try:
        select_stages(ns.repo, ns.stage)
        with prefect_api(ns.api_url):
            result = retrain_flow(repo=ns.repo, stages=ns.stage or None, retries=ns.retries,
                                  stage_timeout_seconds=ns.timeout)
    except CLI_ERRORS as e:
        return report_error(e)
    print("retrained: " + (", ".join(result["pipeline"]["ran"]) or "nothing") if result["ran"] else "up to date: nothing to do")
    return 0


if __name__ == "__main__":
    sys.exit(main())
