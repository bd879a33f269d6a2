"""``d2v finetune --task {image,speech,text}``: fine-tune a classifier on the pretrained encoder
and, with the same budget, on a random one (DVC stage ``finetune@<task>``).

Examples:
  d2v finetune --task image --params params.yaml        # what `dvc repro` runs
  d2v finetune --task text data=default finetune.text.steps=100
  d2v finetune --task speech --config-name pipeline finetune.speech.head=ctc   # letter CTC (WER/CER)
  torchrun --nproc_per_node 8 -m d2v.cli.main finetune --task image experiment=image_base   # DDP
  d2v finetune --task image experiment=image_base --resume   # continue from the checkpoints (finetune.ckpt_every)
Writes <finetune.out_dir>/<task>/{pretrained,random}/ (config.json + weights.pt),
<reports>/metrics/finetune_<task>.json and <reports>/plots/finetune_<task>.tsv, where <reports> is
reports/ for the pipeline's models/finetune (--params params.yaml), else runs/reports/ beside a
quick run's runs/finetune.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from d2v.cli.common import add_config_args, add_progress_arg, config_from_args, reports_root, run_cli, show_progress
from d2v.models.config import MODALITIES


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="d2v finetune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, choices=MODALITIES, help="the downstream task (one per modality)")
    add_config_args(p)
    add_progress_arg(p)
    p.add_argument("--metrics", type=Path, default=None, help="metrics JSON (default <reports>/metrics/finetune_<task>.json)")
    p.add_argument("--history", type=Path, default=None, help="loss TSV (default <reports>/plots/finetune_<task>.tsv)")
    p.add_argument("--resume", action="store_true",
                   help="continue each init from <out_dir>/<task>/checkpoints/<init>.pt (written every "
                        "finetune.ckpt_every steps), exactly; refused if the settings differ")
    ns = p.parse_intermixed_args(argv)

    def run() -> int:
        from d2v.train.finetune import finetune_task

        cfg = config_from_args(ns)
        root = reports_root(cfg.finetune.out_dir)
        runs = finetune_task(cfg, ns.task, progress=show_progress(ns),
                             metrics_path=ns.metrics or root / f"metrics/finetune_{ns.task}.json",
                             history_path=ns.history or root / f"plots/finetune_{ns.task}.tsv", resume=ns.resume)
        if os.environ.get("RANK", "0") != "0":  # once under torchrun (rank 0)
            return 0
        print(json.dumps({k: {"val_accuracy": r.val_accuracy, "out_dir": r.out_dir, "mlflow_run_id": r.mlflow_run_id}
                          for k, r in runs.items()}, indent=2))
        return 0

    return run_cli(run)
