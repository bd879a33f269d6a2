"""Evaluation of a downstream task: fine-tuned accuracy and linear probes, each against random init.

``reports/metrics/eval_<task>.json`` holds

* ``accuracy`` / ``baseline_accuracy``: the heads fine-tuned from the pretrained and from a
  random encoder (same budget, ``d2v finetune``), on ``finetune.<task>.eval_split``, with every
  other score the head gives (a CTC head: ``wer``, ``cer``; accuracy = 1 - WER);
* ``probe_accuracy`` / ``probe_baseline_accuracy``: an L2-regularised logistic regression on the
  frozen, mean-pooled last-block features of the pretrained and of a random encoder (standardised
  features, the same training subset, ``probe_max_train`` samples);
* the MLflow run ids of the fine-tuning runs and of this evaluation run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from d2v.config import Config, to_dict
from d2v.data.downstream import LabelledSplit, load_task_data
from d2v.models.classifier_dir import load_classifier
from d2v.models.heads import Classifier
from d2v.train.finetune import load_backbone, task_setup
from d2v.train.probe import linear_probe


@torch.no_grad()
def extract(clf: Classifier, data: LabelledSplit, batch_size: int, device: torch.device, progress: bool = False,
            desc: str = "features") -> np.ndarray:
    """Frozen mean-pooled features, (N, D) float64."""
    from tqdm import tqdm

    clf.to(device).eval()
    out = []
    for i in tqdm(range(0, len(data), batch_size), desc=desc, disable=not progress, unit="batch", leave=False,
                  dynamic_ncols=True):
        src = data.source[i : i + batch_size].to(device)
        lengths = data.lengths[i : i + batch_size] if data.lengths is not None else None
        out.append(clf.features(src, lengths).float().cpu().numpy())
    return np.concatenate(out).astype(np.float64)


def confusion(pred: torch.Tensor, label: torch.Tensor, n: int) -> np.ndarray:
    m = np.zeros((n, n), dtype=np.int64)
    np.add.at(m, (label.numpy(), pred.numpy()), 1)
    return m


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
    ft, tc, device = task_setup(cfg, task)
    t0 = time.perf_counter()
    clf, meta = load_classifier(Path(ft.out_dir) / task / "pretrained")
    base, _ = load_classifier(Path(ft.out_dir) / task / "random")
    cfg.model = clf.model_cfg  # evaluate the architecture that was fine-tuned
    test = load_task_data(cfg, task, tc.eval_split, tc.max_eval)
    probe_train = load_task_data(cfg, task, "train", tc.probe_max_train)
    names = list(meta.get("labels", []))

    report: dict[str, Any] = {"task": task, "split": tc.eval_split, "eval_samples": len(test),
                              "probe_train_samples": len(probe_train)}
    pred = None
    for prefix, model in (("", clf), ("baseline_", base)):
        scores = model.score(test, 256, device)  # accuracy, and e.g. wer / cer; per-sample outputs
        report.update({f"{prefix}{k}": v for k, v in scores.items() if isinstance(v, float)})
        if not prefix:
            pred = scores.get("pred")  # classes per sample: the confusion matrix
        print(f"{task} {model.head_kind} ({prefix or 'pretrained_'}model): {model.describe(scores)}", flush=True)

    y_tr, y_te = probe_train.label.numpy(), test.label.numpy()
    for key, init in (("probe_accuracy", ft.init), ("probe_baseline_accuracy", "random")):
        t_probe = time.perf_counter()
        backbone = load_backbone(init, cfg.model, cfg.seed)
        feat = Classifier(backbone, task, max(2, len(names)))
        which = "pretrained" if key == "probe_accuracy" else "random init"
        report[key] = linear_probe(extract(feat, probe_train, 256, device, progress, f"{task} probe ({which}): train"),
                                   y_tr, extract(feat, test, 256, device, progress, f"{task} probe ({which}): test"),
                                   y_te, tc.probe_c)
        print(f"{task} linear probe ({which} encoder, {len(probe_train)} -> {len(test)} samples): accuracy "
              f"{report[key]:.4f} ({time.perf_counter() - t_probe:.0f} s)", flush=True)
    report["seconds"] = time.perf_counter() - t0

    if finetune_report is not None and finetune_report.is_file():
        fr = json.loads(finetune_report.read_text())
        report["finetune_run_id"] = fr.get("mlflow_run_id", "")
        report["baseline_run_id"] = fr.get("baseline_mlflow_run_id", "")
    if plot_path is not None and names and pred is not None:
        plot_confusion(confusion(pred, test.label, len(names)), names,
                       f"{task}: fine-tuned from pretraining, {tc.eval_split} accuracy {report['accuracy']:.3f}", plot_path)
    if ft.track:
        from d2v.tracking.mlflow_utils import Tracker

        tracker = Tracker(f"evaluate-{task}", {"task": task, **to_dict(cfg)}, tags={"stage": "evaluate", "task": task})
        tracker.log_shards(cfg.data.root, [task], "eval")
        metrics = {k: report[k] for k in ("accuracy", "baseline_accuracy", "probe_accuracy", "probe_baseline_accuracy")}
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
    return report
