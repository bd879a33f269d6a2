"""``d2v register``: register the pretrained encoder and the fine-tuned classifiers in the MLflow
model registry; the alias ``champion`` moves only when the new version beats the current champion
(DVC stage ``register``).

Examples:
  d2v register --params params.yaml         # what `dvc repro` runs
  d2v register finetune.tasks=[image]
Registered names: <finetune.registry_prefix>-encoder (metric: mean linear-probe accuracy) and
<prefix>-<task>-classifier (metric: test accuracy). Load a champion with
`d2v encode --model models:/d2v-encoder@champion ...`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from d2v.cli.common import add_config_args, config_from_args, reports_root, run_cli


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="d2v register", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--reports", type=Path, default=None,
                   help="folder of the stage reports (default <reports>/metrics: reports/ for the pipeline's "
                        "models/finetune, else runs/reports/)")
    p.add_argument("--out", type=Path, default=None, help="summary JSON (default <reports>/metrics/register.json)")
    ns = p.parse_intermixed_args(argv)

    def run() -> int:
        from d2v.tracking.registry import register_all

        cfg = config_from_args(ns)
        metrics = reports_root(cfg.finetune.out_dir) / "metrics"
        regs = register_all(cfg.finetune.tasks, cfg.finetune.registry_prefix, cfg.finetune.init,
                            ns.reports or metrics, out=ns.out or metrics / "register.json")
        for r in regs:
            moved = "-> champion" if r.promoted else f"(champion stays v{r.previous_champion}: {r.previous_value:.4f})"
            print(f"{r.name} v{r.version}: {r.metric} {r.value:.4f} {moved}")
        return 0

    return run_cli(run)
