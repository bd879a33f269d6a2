"""``d2v report``: one self-contained HTML page of the run (DVC stage 'report').

Pretraining loss, target/prediction variance and the speech front-end health per modality, the
online probe curves, fine-tuning curves for both inits, confusion matrices, the time-to-accuracy
plots, the summary table (with stale marks), the config and the git commit; images embedded.
Missing inputs are listed on the page; exit code 1 when a metrics report is missing or unreadable.

Example:
  d2v report                      # reports/report.html from this folder's reports/
  d2v report --root /path/to/run --out /tmp/report.html
"""

from __future__ import annotations

import argparse
from pathlib import Path

from d2v.cli.common import run_cli


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="d2v report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=Path("."), help="the project folder holding reports/ (default: .)")
    p.add_argument("--out", type=Path, default=None, help="the page (default <root>/reports/report.html)")
    ns = p.parse_args(argv)

    def run() -> int:
        from d2v.report.html import build_report

        out = ns.out or ns.root / "reports/report.html"
        s = build_report(ns.root, out)
        print(f"wrote {out} ({len(s.tasks)} tasks" + (f", {len(s.stale)} stale" if s.stale else "")
              + (f", {len(s.problems)} missing or unreadable" if s.problems else "") + ")")
        for problem in s.problems:
            print(f"  {problem}")
        return 0 if not s.problems else 1

    return run_cli(run)
