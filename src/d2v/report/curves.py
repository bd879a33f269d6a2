"""Curves drawn from the pretraining history, shared by the run report and the pretrain stage's
MLflow run (its loss plot artifact). matplotlib only: the pretrain stage imports this module."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any


def num(v: str | float | None) -> float:
    try:
        return float(v) if v not in (None, "") else math.nan
    except ValueError:
        return math.nan


def by_modality(rows: list[dict[str, Any]], x: str, y: str) -> dict[str, tuple[list[float], list[float]]]:
    out: dict[str, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
    for r in rows:
        xv, yv = num(r.get(x)), num(r.get(y))
        if math.isfinite(xv) and math.isfinite(yv):
            out[r.get("modality", "?")][0].append(xv)
            out[r.get("modality", "?")][1].append(yv)
    return dict(out)


def loss_figure(rows: list[dict[str, Any]]) -> Any:
    """Pretraining loss per modality against the step (rows of the history TSV, or its dicts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    for m, (x, y) in by_modality(rows, "step", "loss").items():
        ax.plot(x, y, label=m, lw=1)
    ax.set(xlabel="step", ylabel="loss", title="pretraining loss per modality")
    ax.legend()
    return fig
