"""Evaluation of a downstream task: fine-tuned accuracy and linear probes, each against random init.

``reports/metrics/eval_<task>.json`` holds

* ``accuracy`` / ``baseline_accuracy``: the heads fine-tuned from the pretrained and from a
  random encoder (same budget, ``d2v finetune``), on ``finetune.<task>.eval_split``, with every
  other score the head gives (a CTC head: ``wer``, ``cer``; accuracy = 1 - WER; on LibriSpeech
  also per subset, e.g. ``wer_test_clean`` and ``wer_test_other``);
* ``probe_accuracy`` / ``probe_baseline_accuracy``: an L2-regularised logistic regression on the
  frozen, mean-pooled last-block features of the pretrained and of a random encoder (standardised
  features, the same training subset, ``probe_max_train`` samples);
* the MLflow run ids of the fine-tuning runs and of this evaluation run.

Every pass streams the shards (:func:`d2v.data.downstream.eval_batches`): scores are additive
counts per batch, and the probe's memory is its capped feature rows. Under torchrun each process
takes every W-th batch; counts are summed and features gathered to rank 0 in split order, so W
processes report exactly what one does.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from d2v.config import Config, to_dict
from d2v.data.downstream import eval_batches, task_inputs
from d2v.models.classifier_dir import load_classifier
from d2v.models.heads import Classifier
from d2v.train import distributed
from d2v.train.distributed import DistInfo
from d2v.train.finetune import load_backbone, score_split, task_setup, use_bf16
from d2v.train.probe import linear_probe


@torch.no_grad()
def extract(clf: Classifier, cfg: Config, task: str, split: str, max_n: int, info: DistInfo,
            progress: bool = False, desc: str = "features") -> tuple[np.ndarray, np.ndarray]:
    """Frozen mean-pooled features (N, D) float64 and labels (N,) of one streamed pass over
    ``split``; under DDP each rank extracts its batches and rank 0 gets all rows in split order
    (other ranks get empty arrays)."""
    from tqdm import tqdm

    tc, device = getattr(cfg.finetune, task), info.device
    clf.to(device).eval()
    inputs = task_inputs(cfg, task, pad_to_longest=True)
    # Rows go into one growing array, not a list of per-batch arrays: thousands of small arrays
    # fragment the C heap (+60-80 MiB over 10,000 samples, BENCHMARKS.md "memory vs split size").
    feats, labels = np.empty((0, 0), np.float32), np.empty(0, np.int64)
    spans: list[tuple[int, int, int]] = []  # (batch index, first row, end row)
    n = 0
    bar = tqdm(desc=desc, disable=not progress, unit="sample", leave=False, dynamic_ncols=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16(cfg.finetune.precision, device)):
        for i, b in eval_batches(cfg.data.root, inputs, split, tc.eval_batch_size, max_n, info.rank, info.world_size):
            clf.encoder.check_input(b.source)  # on the CPU, before the transfer (no device sync)
            f = clf.features(b.source.to(device), b.lengths).float().cpu().numpy()
            if n + len(f) > len(feats):
                grown = np.empty((max(2 * len(feats), n + len(f), 1024), f.shape[1]), np.float32)
                grown[:n] = feats[:n] if n else 0
                feats = grown
                labels = np.concatenate([labels[:n], np.empty(len(grown) - n, np.int64)])
            feats[n : n + len(f)], labels[n : n + len(f)] = f, b.label.numpy()
            spans.append((i, n, n + len(f)))
            n += len(f)
            bar.update(len(b))
    bar.close()
    if info.distributed:  # every rank's batches, in split order, to rank 0
        mine = [(i, feats[a:e], labels[a:e]) for i, a, e in spans]
        parts = sorted((p for ps in distributed.all_gather_object(mine) for p in ps), key=lambda p: p[0])
        if not info.is_main or not parts:
            return np.zeros((0, 0)), np.zeros(0, dtype=np.int64)
        return np.concatenate([p[1] for p in parts]).astype(np.float64), np.concatenate([p[2] for p in parts])
    return feats[:n].astype(np.float64), labels[:n]


def plot_confusion(m: np.ndarray, names: list[str], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(names)
    size = max(4.0, 0.28 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    norm = m / np.maximum(m.sum(1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), names, rotation=90, fontsize=7)
    ax.set_yticks(range(n), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate_task(cfg: Config, task: str, metrics_path: Path | None = None,
                  plot_path: Path | None = None, finetune_report: Path | None = None,
                  progress: bool = False) -> dict[str, Any]:
    """Score both fine-tuned classifiers and probe both encoders, in one process or under torchrun."""
    ft, _ = task_setup(cfg, task)
    with distributed.process_group(ft.device) as info:
        report = _evaluate(cfg, task, info, progress and info.is_main)
        if info.is_main:
            _finish(cfg, task, report, metrics_path, plot_path, finetune_report)
        distributed.barrier()
    return report


def _evaluate(cfg: Config, task: str, info: DistInfo, progress: bool) -> dict[str, Any]:
    ft, tc = cfg.finetune, getattr(cfg.finetune, task)
    t0 = time.perf_counter()
    clf, meta = load_classifier(Path(ft.out_dir) / task / "pretrained")
    base, _ = load_classifier(Path(ft.out_dir) / task / "random")
    cfg.model = clf.model_cfg  # evaluate the architecture that was fine-tuned
    names = list(meta.get("labels", []))
    report: dict[str, Any] = {"task": task, "split": tc.eval_split, "labels": names}
    for prefix, model in (("", clf), ("baseline_", base)):
        which = "pretrained" if not prefix else "random init"
        scores = score_split(model, cfg, task, tc.eval_split, tc.max_eval, info, progress,
                             f"{task} ({which}): {tc.eval_split}")
        report.update({f"{prefix}{k}": v for k, v in scores.items() if isinstance(v, float)})
        if not prefix:
            report["eval_samples"] = scores.get("samples")
            report["confusion"] = scores.get("confusion")  # classes: the confusion matrix (dropped from the JSON)
        if info.is_main:
            print(f"{task} {model.head_kind} ({which} model): {model.describe(scores)}", flush=True)

    for key, init in (("probe_accuracy", ft.init), ("probe_baseline_accuracy", "random")):
        t_probe = time.perf_counter()
        feat = Classifier(load_backbone(init, cfg.model, cfg.seed), task, max(2, len(names)))
        which = "pretrained" if key == "probe_accuracy" else "random init"
        x_tr, y_tr = extract(feat, cfg, task, "train", tc.probe_max_train, info, progress, f"{task} probe ({which}): train")
        x_te, y_te = extract(feat, cfg, task, tc.eval_split, tc.max_eval, info, progress,
                             f"{task} probe ({which}): {tc.eval_split}")
        acc = linear_probe(x_tr, y_tr, x_te, y_te, tc.probe_c) if info.is_main else None
        report[key] = float(distributed.broadcast_object(acc))
        report["probe_train_samples"] = len(y_tr)
        if report.get("eval_samples") is None:
            report["eval_samples"] = len(y_te)
        if info.is_main:
            print(f"{task} linear probe ({which} encoder, {len(y_tr)} -> {len(y_te)} samples): accuracy "
                  f"{report[key]:.4f} ({time.perf_counter() - t_probe:.0f} s)", flush=True)
    report["seconds"] = time.perf_counter() - t0
    return report


def _finish(cfg: Config, task: str, report: dict[str, Any], metrics_path: Path | None, plot_path: Path | None,
            finetune_report: Path | None) -> None:
    """Rank 0: the confusion plot, the MLflow run, the JSON report."""
    tc = getattr(cfg.finetune, task)
    names, conf = report.pop("labels"), report.pop("confusion", None)
    if finetune_report is not None and finetune_report.is_file():
        fr = json.loads(finetune_report.read_text())
        report["finetune_run_id"] = fr.get("mlflow_run_id", "")
        report["baseline_run_id"] = fr.get("baseline_mlflow_run_id", "")
    if plot_path is not None and names and conf is not None:
        plot_confusion(conf, names, f"{task}: fine-tuned from pretraining, {tc.eval_split} accuracy "
                                    f"{report['accuracy']:.3f}", plot_path)
    if cfg.finetune.track:
        from d2v.tracking.mlflow_utils import Tracker

        tracker = Tracker(f"evaluate-{task}", {"task": task, **to_dict(cfg)}, tags={"stage": "evaluate", "task": task})
        tracker.log_shards(cfg.data.root, [task], "eval")
        metrics = {k: report[k] for k in ("accuracy", "baseline_accuracy", "probe_accuracy", "probe_baseline_accuracy")}
        metrics.update({k: v for k, v in report.items() if k.startswith(("wer", "cer", "baseline_wer", "baseline_cer"))})
        tracker.log(metrics, 0)
        report["mlflow_run_id"] = tracker.run_id
        # The fine-tuning runs get their test accuracy too, so `mlflow ui` can sort them by it.
        for rid, acc in ((report.get("finetune_run_id"), report["accuracy"]),
                         (report.get("baseline_run_id"), report["baseline_accuracy"])):
            if rid:
                tracker.client.log_metric(rid, f"{tc.eval_split}_accuracy", acc)
        if plot_path is not None and plot_path.exists():
            tracker.artifact(plot_path, "plots")
        tracker.finish()
    if metrics_path is not None:
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text(json.dumps(report, indent=2))
