"""Prefect flows that orchestrate the project's DVC pipeline (no ML code here).

- ``flows.pipeline``: ``pipeline_flow`` runs DVC stages as Prefect tasks (``dvc repro <stage>``).
- ``flows.sweep``: ``sweep_flow`` queues ``dvc exp run --queue -S ...`` over a grid and runs the queue.
- ``flows.retrain``: ``retrain_flow`` runs the pipeline only when ``dvc status`` reports changes.
- ``flows.serve``: ``python -m flows.serve`` serves all three as deployments (cron schedules).

Their Prefect-free helpers, one concern each, so that bad input is refused before Prefect (about
a second to import) is even loaded:

- ``flows.stages``: the DVC repository, its stages in run order, ``dvc status``;
- ``flows.overrides``: ``-S key=value`` overrides and sweep grids, checked and applied to params.yaml;
- ``flows.streaming``: running ``dvc`` with its output streamed line by line into the run's log;
- ``flows.server``: the Prefect server's URL and health check;
- ``flows.results``: MLflow run ids in the stages' JSON outputs, the results artifact;
- ``flows.errors``: the errors, and how the command lines report them.
"""
