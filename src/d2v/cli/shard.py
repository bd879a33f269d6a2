"""``d2v shard --modality m``: WebDataset shards + wids indexes per split (DVC stage ``shard@m``).

Writes ``data/shards/<m>/<split>-NNNNNN.tar``, ``<split>.json`` (wids index) and ``summary.json``
(byte-identical for the same inputs and seed), and ``reports/data/shard_<m>.json``: the same summary
with the stage's wall time.

Example:
  d2v shard --modality image --params params.yaml
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from d2v.cli.common import add_config_args, add_progress_arg, config_from_args, run_cli, show_progress


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="d2v shard", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modality", required=True, choices=["image", "speech", "text"])
    p.add_argument("--tokenizer", type=Path, default=Path("models/tokenizer/spm.model"))
    add_progress_arg(p)
    add_config_args(p)
    ns = p.parse_intermixed_args(argv)

    def run() -> int:
        from d2v.data.shards import write_shards

        cfg = config_from_args(ns)
        s = cfg.data.shard
        summary = write_shards(ns.modality, Path(cfg.data.root), cfg.seed, s.maxcount, s.min_shards,
                               tokenizer_path=ns.tokenizer if ns.modality == "text" else None,
                               sample_rate=cfg.data.speech.sample_rate, progress=show_progress(ns))
        report = Path("reports/data") / f"shard_{ns.modality}.json"
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(summary, indent=2))
        print(json.dumps(summary, indent=2))
        return 0

    return run_cli(run)
