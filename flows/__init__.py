"""Prefect flows that orchestrate the project's DVC pipeline (no ML code here).

- ``flows.pipeline``: ``pipeline_flow`` runs DVC stages as Prefect tasks (``dvc repro <stage>``).
- ``flows.sweep``: ``sweep_flow`` queues ``dvc exp run --queue -S ...`` over a grid and runs the queue.
- ``flows.retrain``: ``retrain_flow`` runs the pipeline only when ``dvc status`` reports changes.
- ``flows.serve``: ``python -m flows.serve`` serves all three as deployments (cron schedules).

``flows.common`` holds the Prefect-free helpers (stage lists, validation, streaming subprocesses),
so that bad input is refused before Prefect (about a second to import) is even loaded.
"""
