"""``d2v pretrain``: self-supervised pretraining (DVC stage ``pretrain``).

Two defaults, on purpose (README "Configs"):
  d2v pretrain                       conf/config.yaml: small BUILT-IN data (data=sample, no data
                                     stages needed), writes runs/pretrain/ (checkpoint.pt,
                                     metrics.json, loss.tsv): never the pipeline's DVC outputs
  d2v pretrain --params params.yaml  what `dvc repro` runs (conf/pipeline.yaml): the data stages'
                                     SHARDS (data=default), writes models/pretrain/,
                                     reports/metrics/pretrain.json, reports/plots/pretrain_loss.tsv

Examples:
  d2v pretrain experiment=tiny train.max_steps=30 train.modalities=[image]
  d2v pretrain data=default train.track=false  # the pipeline's data (after the data stages), untracked
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

from d2v.cli.common import add_config_args, add_progress_arg, config_from_args, run_cli, show_progress

# The `pretrain` stage's metrics and plots in dvc.yaml: written only when asked to (--params, as the
# stage runs it, or these flags), so a quick run from the project root leaves the pipeline's alone.
STAGE_METRICS = Path("reports/metrics/pretrain.json")
STAGE_HISTORY = Path("reports/plots/pretrain_loss.tsv")
STAGE_PROBE = Path("reports/plots/pretrain_probe.tsv")


def report_paths(cfg, from_params: bool, metrics: Path | None, history: Path | None) -> tuple[Path, Path, Path]:
    """Where the metrics JSON, loss TSV and probe TSV go: the flags; else, for ``--params`` (the DVC
    stage), the stage's outputs; else next to the checkpoint in ``train.out_dir``."""
    out = Path(cfg.train.out_dir)
    if from_params:
        return metrics or STAGE_METRICS, history or STAGE_HISTORY, STAGE_PROBE
    h = history or out / "loss.tsv"
    return metrics or out / "metrics.json", h, h.with_name("probe.tsv")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="d2v pretrain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--resume", action="store_true",
                   help="continue from <train.out_dir>/checkpoint.pt if present (from step 0, with a note, if not)")
    p.add_argument("--resume-from", type=Path, default=None, metavar="CHECKPOINT",
                   help="continue from this checkpoint file (an error if it does not exist)")
    add_progress_arg(p)
    p.add_argument("--metrics", type=Path, default=None,
                   help=f"metrics JSON output (default: with --params {STAGE_METRICS}, the DVC stage's; "
                        "otherwise <train.out_dir>/metrics.json)")
    p.add_argument("--history", type=Path, default=None,
                   help=f"per-step TSV output (default: with --params {STAGE_HISTORY}; otherwise <train.out_dir>/loss.tsv)")
    ns = p.parse_intermixed_args(argv)

    def run() -> int:
        from d2v.train.pretrain import pretrain

        cfg = config_from_args(ns)
        metrics, history, probe = report_paths(cfg, ns.params is not None, ns.metrics, ns.history)
        res = pretrain(cfg, resume=ns.resume_from or ns.resume, progress=show_progress(ns), metrics_path=metrics,
                       history_path=history, probe_path=probe)
        if os.environ.get("RANK", "0") == "0":  # once under torchrun (rank 0)
            final_probe = {r["modality"]: r["accuracy"] for r in res.probes if r["step"] == res.steps}
            print(json.dumps({"objective": cfg.train.objective, "first_loss": res.first_loss,
                              "final_loss": res.last_loss, "median_step_time_s": res.step_time_s,
                              "samples_per_s": res.samples_per_s, "copies_per_s": res.copies_per_s,
                              "probe": final_probe, "checkpoint": res.checkpoint}, indent=2))
        return 0

    return run_cli(run)
