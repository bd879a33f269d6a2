"""What a run produced: the MLflow run ids in the stages' JSON outputs, and the results artifact.

The stages write ``mlflow_run_id`` (and ``*_run_id``) keys into their JSON reports; the flows
collect them so a run's result and its Prefect artifact point at the MLflow runs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from flows.streaming import run_log


def find_run_ids(tree: Any, prefix: str = "") -> dict[str, str]:
    """``{"eval.probe_run_id": "<id>"}``: every non-empty string under a key ending in ``run_id``,
    at any depth of a JSON-like tree, keyed by its dotted path."""
    found: dict[str, str] = {}
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            key = f"{prefix}{k}"
            if isinstance(v, str) and str(k).endswith("run_id") and v:
                found[key] = v
            else:
                found.update(find_run_ids(v, key + "."))
    return found


def collect_run_ids(repo: Path, paths: Iterable[str]) -> dict[str, str]:
    """``{"reports/metrics/pretrain.json:mlflow_run_id": "<id>"}`` for every key ending in
    ``run_id`` (at any depth) in the JSON files among ``paths``."""
    found: dict[str, str] = {}
    for rel in paths:
        p = repo / rel
        if p.suffix != ".json" or not p.is_file() or p.stat().st_size > 10_000_000:
            continue
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        found.update({f"{rel}:{k}": v for k, v in find_run_ids(data).items()})
    return found


def publish(summary: dict[str, Any], key: str, markdown: str) -> None:
    """A Markdown artifact on the run (best effort: never fails the run)."""
    try:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(markdown=markdown, key=key, description=f"{key} results")
    except Exception as e:  # noqa: BLE001
        run_log()(logging.WARNING, f"could not publish the results artifact: {e}")
