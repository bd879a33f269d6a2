"""``d2v pretrain``: self-supervised pretraining (DVC stage ``pretrain``).

Examples:
  d2v pretrain                                 # conf/ defaults: the tiny model on built-in data
  d2v pretrain experiment=tiny train.max_steps=30 train.modalities=[image]
  d2v pretrain --params params.yaml            # what `dvc repro` runs
  d2v pretrain --params params.yaml --resume   # continue from models/pretrain/checkpoint.pt
  d2v pretrain --resume-from run1/checkpoint.pt train.out_dir=run2

Several GPUs or nodes (DDP; train.batch_size is the global batch, split over the processes):
  torchrun --nproc_per_node 4 -m d2v.cli.main pretrain --params params.yaml
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from d2v.cli.common import add_config_args, config_from_args, run_cli


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="d2v pretrain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--resume", action="store_true",
                   help="continue from <train.out_dir>/checkpoint.pt if present (from step 0, with a note, if not)")
    p.add_argument("--resume-from", type=Path, default=None, metavar="CHECKPOINT",
                   help="continue from this checkpoint file (an error if it does not exist)")
    p.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    p.add_argument("--metrics", type=Path, default=Path("reports/metrics/pretrain.json"), help="metrics JSON output")
    p.add_argument("--history", type=Path, default=Path("reports/plots/pretrain_loss.tsv"), help="per-step TSV output")
    ns = p.parse_intermixed_args(argv)

    def run() -> int:
        from d2v.train.pretrain import pretrain

        cfg = config_from_args(ns)
        res = pretrain(cfg, resume=ns.resume_from or ns.resume, progress=not ns.no_progress, metrics_path=ns.metrics, history_path=ns.history)
        if os.environ.get("RANK", "0") == "0":  # once under torchrun (rank 0)
            print(json.dumps({"first_loss": res.first_loss, "final_loss": res.last_loss,
                              "median_step_time_s": res.step_time_s, "checkpoint": res.checkpoint}, indent=2))
        return 0

    return run_cli(run)
