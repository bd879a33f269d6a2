"""Serve the project's flows as Prefect deployments, with one command.

    python -m flows.serve                      # or: scripts/serve_flows.sh

Three deployments, run by this process while it lives (Ctrl+C stops it and pauses the schedules):

- ``d2v-pipeline/scheduled``: ``pipeline_flow`` on a cron schedule (default 02:00 every day),
  parameters ``stages`` and ``experiment``/``overrides`` (which experiment);
- ``d2v-retrain/on-change``: ``retrain_flow`` every hour: the pipeline runs only if ``dvc status``
  reports changes;
- ``d2v-sweep/grid``: ``sweep_flow`` (no schedule by default: run it from the UI with a grid).

The Prefect server must be up (``scripts/prefect_server.sh``); its URL is ``--api-url``, else
PREFECT_API_URL, else http://127.0.0.1:4200/api. Everything is checked before serving: the
repository, the stages, the overrides, the grid and the server's health.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

from flows.errors import FlowInputError, ServerUnreachableError, report_error
from flows.overrides import experiment_overrides, parse_grid_arg
from flows.server import DEFAULT_API_URL, check_server
from flows.stages import PROJECT_ROOT, select_stages

DEPLOYMENTS = ("pipeline", "retrain", "sweep")
DEFAULT_PIPELINE_CRON = "0 2 * * *"
DEFAULT_RETRAIN_CRON = "0 * * * *"
NAMES = {"pipeline": "d2v-pipeline/scheduled", "retrain": "d2v-retrain/on-change", "sweep": "d2v-sweep/grid"}


def _cron(value: str | None, timezone: str = "UTC") -> str | None:
    """A cron string, or None for 'none'/'off'/'' (no schedule); rejects malformed expressions."""
    if value is None or value.strip().lower() in ("", "none", "off"):
        return None
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    try:
        CronSchedule(cron=value, timezone=timezone)
    except ValidationError as e:
        msg = "; ".join(err["msg"] for err in e.errors())
        raise FlowInputError(f"bad schedule {value!r} (time zone {timezone!r}): {msg}") from None
    return value


def build_deployments(
    repo: Path,
    *,
    only: tuple[str, ...] = DEPLOYMENTS,
    pipeline_cron: str | None = DEFAULT_PIPELINE_CRON,
    retrain_cron: str | None = DEFAULT_RETRAIN_CRON,
    sweep_cron: str | None = None,
    timezone: str = "UTC",
    stages: list[str] | None = None,
    experiment: str | None = None,
    overrides: list[str] | None = None,
    grid: dict[str, list[Any]] | None = None,
    retries: int = 1,
    stage_timeout_seconds: float | None = None,
) -> list[Any]:
    """The RunnerDeployments to serve (imports the flows, hence Prefect)."""
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    from flows.pipeline import DEFAULT_STAGE_TIMEOUT_S, pipeline_flow
    from flows.retrain import retrain_flow
    from flows.sweep import DEFAULT_GRID, sweep_flow

    timeout = stage_timeout_seconds or DEFAULT_STAGE_TIMEOUT_S
    common: dict[str, Any] = dict(entrypoint_type=EntrypointType.MODULE_PATH, tags=["d2v", "dvc"], concurrency_limit=1)

    def schedules(cron: str | None) -> list[Any]:
        return [Cron(cron, timezone=timezone)] if cron else []

    out = []
    if "pipeline" in only:
        out.append(pipeline_flow.to_deployment(
            name="scheduled", schedules=schedules(pipeline_cron),
            description=f"dvc repro of {repo} on a schedule; set `experiment`/`overrides` to run a DVC experiment.",
            parameters={"repo": str(repo), "stages": stages or None, "experiment": experiment,
                        "overrides": list(overrides or []), "retries": retries, "stage_timeout_seconds": timeout},
            **common))
    if "retrain" in only:
        out.append(retrain_flow.to_deployment(
            name="on-change", schedules=schedules(retrain_cron),
            description=f"Runs the pipeline of {repo} only when `dvc status` reports changes.",
            parameters={"repo": str(repo), "stages": stages or None, "retries": retries,
                        "stage_timeout_seconds": timeout},
            **common))
    if "sweep" in only:
        out.append(sweep_flow.to_deployment(
            name="grid", schedules=schedules(sweep_cron),
            description=f"Queues `dvc exp run --queue -S ...` over `grid` in {repo} and runs the queue.",
            parameters={"repo": str(repo), "grid": grid or DEFAULT_GRID, "experiment": experiment,
                        "overrides": list(overrides or [])},
            **common))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m flows.serve",
        description="Serve the d2v flows as Prefect deployments (pipeline on a cron schedule, retrain-on-change, "
                    "experiment sweep). Runs until Ctrl+C; the runs execute in this process's machine.",
        epilog="Examples:\n"
               "  scripts/prefect_server.sh &           # the server and UI on http://127.0.0.1:4200\n"
               "  python -m flows.serve                 # serve all three deployments\n"
               "  python -m flows.serve --pipeline-cron '30 1 * * *' --experiment image_base\n"
               "  python -m flows.serve --only pipeline --stage pretrain --dry-run\n"
               "  prefect deployment run d2v-pipeline/scheduled -p stages='[\"pretrain\"]'   # trigger a run\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--repo", default=str(PROJECT_ROOT), help="DVC repository the flows work on (default: %(default)s)")
    p.add_argument("--api-url", default=None,
                   help=f"Prefect API URL (default: PREFECT_API_URL, else {DEFAULT_API_URL})")
    p.add_argument("--only", action="append", choices=DEPLOYMENTS, default=[],
                   help="serve only these deployments (repeatable; default: all)")
    p.add_argument("--pipeline-cron", default=DEFAULT_PIPELINE_CRON,
                   help="cron of d2v-pipeline/scheduled ('none': no schedule; default: %(default)s)")
    p.add_argument("--retrain-cron", default=DEFAULT_RETRAIN_CRON,
                   help="cron of d2v-retrain/on-change ('none': no schedule; default: %(default)s)")
    p.add_argument("--sweep-cron", default="none", help="cron of d2v-sweep/grid (default: none, run it by hand)")
    p.add_argument("--timezone", default="UTC", help="time zone of the cron schedules (default: %(default)s)")
    p.add_argument("--stage", action="append", default=[], metavar="NAME",
                   help="default stages of the pipeline/retrain deployments (repeatable; default: all)")
    p.add_argument("--experiment", default=None, help="default Hydra experiment of the pipeline and sweep deployments")
    p.add_argument("-S", "--set-param", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="default overrides of the pipeline and sweep deployments (repeatable)")
    p.add_argument("-g", "--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="default grid axis of the sweep deployment (repeatable; default: train.lr=0.0001,0.0005)")
    p.add_argument("--retries", type=int, default=1, help="retries of a failed stage (default: %(default)s)")
    p.add_argument("--stage-timeout", type=float, default=None, help="timeout per stage in seconds (default: 6 h)")
    p.add_argument("--limit", type=int, default=1, help="flow runs at the same time (default: %(default)s: DVC locks "
                   "the workspace anyway)")
    p.add_argument("--dry-run", action="store_true", help="check everything and list the deployments, but do not serve")
    return p


def _ctrl_c_as_sigterm() -> None:
    """Ctrl+C takes Prefect's SIGTERM path: graceful shutdown, schedules paused, exit 0.

    Under ``asyncio.run`` the first SIGINT only cancels the main task, and Prefect's runner can
    swallow that cancellation mid-poll: the served process then kept running after Ctrl+C (seen
    once in CI, where it stopped only on a later SIGTERM)."""

    def handler(signum: int, frame: Any) -> None:
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            raise KeyboardInterrupt  # the runner has not started yet: nothing to pause
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGINT, handler)
    # Prefect's SIGTERM handler calls the async Runner.stop without awaiting it; the shutdown itself
    # (pause, exit 0) is done by the runner's context exit, so the warning is noise here.
    warnings.filterwarnings("ignore", message="coroutine 'Runner.astop' was never awaited")


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    only = tuple(ns.only) or DEPLOYMENTS
    try:
        root, _, _ = select_stages(ns.repo, ns.stage)
        experiment_overrides(root, ns.experiment, ns.overrides)
        grid = parse_grid_arg(ns.grid) if ns.grid else None
        crons = {k: _cron(v, ns.timezone) for k, v in (("pipeline", ns.pipeline_cron), ("retrain", ns.retrain_cron),
                                          ("sweep", ns.sweep_cron))}
        if "sweep" in only:
            from flows.sweep import validate_sweep_args

            validate_sweep_args(str(root), grid, ns.experiment, ns.overrides)
        url = ns.api_url or os.environ.get("PREFECT_API_URL") or DEFAULT_API_URL
        if not ns.dry_run:
            check_server(url)
    except (FlowInputError, ServerUnreachableError) as e:
        return report_error(e)
    # The served runs (child processes) find the server and this package through the environment.
    os.environ["PREFECT_API_URL"] = url
    os.environ["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    from prefect import serve
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}):
        deployments = build_deployments(
            root, only=only, pipeline_cron=crons["pipeline"], retrain_cron=crons["retrain"],
            sweep_cron=crons["sweep"], timezone=ns.timezone, stages=ns.stage or None, experiment=ns.experiment,
            overrides=ns.overrides, grid=grid, retries=ns.retries, stage_timeout_seconds=ns.stage_timeout)
        for d in deployments:
            sched = ", ".join(f"cron '{s.schedule.cron}' ({s.schedule.timezone})" for s in d.schedules or []) or "no schedule"
            print(f"deployment {d.flow_name}/{d.name}: {sched}; parameters {d.parameters}")
        if ns.dry_run:
            return 0
        print(f"serving on {url} (UI: {url.removesuffix('/api')}); Ctrl+C to stop", flush=True)
        _ctrl_c_as_sigterm()
        serve(*deployments, limit=ns.limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
