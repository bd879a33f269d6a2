"""``d2v validate --modality m``: Great Expectations checks of the manifests (DVC stage ``validate@m``).

Writes ``reports/validation/<m>.json``; exits 1 with a readable summary when an expectation
fails, so that ``dvc repro`` stops before sharding or training on bad data.

Example:
  d2v validate --modality speech --params params.yaml
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from d2v.cli.common import add_config_args, config_from_args, run_cli


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="d2v validate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modality", required=True, choices=["image", "speech", "text"])
    p.add_argument("--report", type=Path, default=None, help="report path (default reports/validation/<m>.json)")
    add_config_args(p)
    ns = p.parse_intermixed_args(argv)

    def run() -> int:
        from d2v.data.validation import summarize, validate_modality

        cfg = config_from_args(ns)
        report_path = ns.report or Path("reports/validation") / f"{ns.modality}.json"
        limits: dict = {"sample_rate": cfg.data.speech.sample_rate}
        if ns.modality == "text" and cfg.data.text.dataset != "kjv_rt":
            limits["labels"] = {"text": None}  # the fresh/rotten label set is kjv_rt's; your own labels are any
        try:
            report = validate_modality(ns.modality, Path(cfg.data.root), report_path, limits)
        except RuntimeError as e:  # Great Expectations failed internally: one readable line
            print(f"d2v validate: error: {e}", file=sys.stderr)
            return 2
        print(summarize(report))
        if not report["success"]:
            print(f"d2v validate: {ns.modality} manifests failed validation (report: {report_path})", file=sys.stderr)
            return 1
        return 0

    return run_cli(run)
