"""``d2v summary``: did pretraining help, per task, and how fast; read from the stage reports.

Prints, from ``reports/metrics/`` (and the data stages' reports) under ``--root``: per task the test
accuracy fine-tuned from pretraining vs from random init and the two linear probes, each difference
with its standard error and a verdict; pretraining throughput; wall time per stage; where to look
next. Numbers whose stage inputs changed after they were written are marked stale (needs the
``dvc.lock`` beside ``reports/``). Exit code 1 when a report is missing or unreadable (what can be
shown still is), 0 otherwise.

Examples:
  d2v summary                 # the pipeline in this folder (the main command ends with it)
  d2v summary --root /path/to/another/clone
  d2v summary --json          # the same, as JSON
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from d2v.cli.common import run_cli


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="d2v summary", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=Path("."), help="the project folder holding reports/ (default: .)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    ns = p.parse_args(argv)

    def run() -> int:
        from d2v.report.summary import render, summarize
        from d2v.tracking.mlflow_utils import tracking_uri

        s = summarize(ns.root)
        if ns.json:
            d = asdict(s)
            d["root"] = str(s.root)
            for t, task in zip(d["tasks"], s.tasks):
                for k in ("finetuned", "probe"):
                    c = getattr(task, k)
                    t[k].update(diff=c.diff, stderr=c.stderr, verdict=c.verdict)
            print(json.dumps(d, indent=2))
        else:
            print(render(s, tracking_uri()))
        return 0 if not s.problems else 1

    return run_cli(run)
