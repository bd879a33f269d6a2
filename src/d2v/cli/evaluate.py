"""``d2v evaluate --task {image,speech,text}``: test accuracy of the fine-tuned and the random-init
classifier, and linear probes of pretrained vs random frozen features (DVC stage ``evaluate@<task>``).

Examples:
  d2v evaluate --task image --params params.yaml --no-progress   # what `dvc repro` runs
  torchrun --nproc_per_node 8 -m d2v.cli.main evaluate --task image experiment=image_base   # DDP
Writes <reports>/metrics/eval_<task>.json (accuracy, baseline_accuracy, probe_accuracy,
probe_baseline_accuracy, MLflow run ids) and <reports>/plots/eval_<task>_confusion.png, where
<reports> is reports/ for the pipeline's models/finetune, else runs/reports/ (as d2v finetune).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from d2v.cli.common import add_config_args, add_progress_arg, config_from_args, reports_root, run_cli, show_progress
from d2v.models.config import MODALITIES


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="d2v evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, choices=MODALITIES, help="the downstream task (one per modality)")
    add_config_args(p)
    add_progress_arg(p)
    p.add_argument("--metrics", type=Path, default=None, help="report JSON (default <reports>/metrics/eval_<task>.json)")
    p.add_argument("--plot", type=Path, default=None, help="confusion matrix PNG (default <reports>/plots/eval_<task>_confusion.png)")
    ns = p.parse_intermixed_args(argv)

    def run() -> int:
        from d2v.train.evaluate import evaluate_task

        cfg = config_from_args(ns)
        root = reports_root(cfg.finetune.out_dir)
        report = evaluate_task(cfg, ns.task,
                               metrics_path=ns.metrics or root / f"metrics/eval_{ns.task}.json",
                               plot_path=ns.plot or root / f"plots/eval_{ns.task}_confusion.png",
                               finetune_report=root / f"metrics/finetune_{ns.task}.json",
                               progress=show_progress(ns))
        if os.environ.get("RANK", "0") == "0":  # once under torchrun (rank 0)
            print(json.dumps(report, indent=2))
        return 0

    return run_cli(run)
