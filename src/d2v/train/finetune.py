"""Fine-tuning: one downstream head per modality on the pretrained (or a random) encoder.

The heads (``d2v.models.heads``): a ``Classifier`` (mean-pooled features -> norm -> Linear, the
fairseq ``MaeImageClassificationModel``'s recipe, for all three modalities) or, for ``finetune.speech.head=ctc``, a
``CTCRecognizer``; each brings its loss and its scores, so this loop is the same for both. AdamW
with layer-wise learning-rate decay (the local/context encoder is layer 0, block i is layer i+1,
the head layer depth+1), linear warm-up then cosine, label smoothing (classification).
``pool_norm="batch"`` swaps the Classifier's LayerNorm for a BatchNorm without affine: on the tiny
speech model the pooled features are dominated by a few near-constant directions that a LayerNorm
keeps, and the head then barely learns (BENCHMARKS.md "Downstream tasks").

``finetune_task`` trains the pretrained and the random-init model with the same budget, seed and
batches, saves both as classifier folders (``d2v.models.classifier_dir``) and reports validation
accuracy (for CTC: word accuracy, 1 - WER).
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from d2v.config import Config, TaskConfig, to_dict
from d2v.data.downstream import LabelledSplit, label_names, load_task_data
from d2v.device import pick_device
from d2v.models import Data2Vec2
from d2v.models.classifier_dir import save_classifier
from d2v.models.config import ModelConfig
from d2v.models.heads import Classifier, make_head
from d2v.train.schedule import lr_at

INITS = ("pretrained", "random")


# ------------------------------------------------------------------------------ backbones
def load_backbone(init: str, model_cfg: ModelConfig, seed: int, map_location: str = "cpu") -> Data2Vec2:
    """``init`` = ``random`` (a fresh model from ``model_cfg``, seeded) or a path to a pretrained
    checkpoint / model folder."""
    if init == "random":
        torch.manual_seed(seed)
        return Data2Vec2(model_cfg)
    from d2v.models.model_dir import load_model_dir

    model, _ = load_model_dir(init, map_location=map_location)
    return model


# ------------------------------------------------------------------------------ training
def accuracy(clf: Classifier, data: LabelledSplit, batch_size: int, device: torch.device) -> float:
    """The head's ``accuracy`` score: classification accuracy; for a CTC model, word accuracy (1 - WER)."""
    return float(clf.score(data, batch_size, device)["accuracy"])


@dataclass
class FinetuneRun:
    init: str
    val_accuracy: float
    train_loss: list[float] = field(default_factory=list)
    seconds: float = 0.0
    out_dir: str = ""
    mlflow_run_id: str = ""


def train_classifier(clf: Classifier, train: LabelledSplit, tc: TaskConfig, seed: int, device: torch.device,
                     progress: bool = True, desc: str = "finetune", tracker: Any = None) -> list[float]:
    """``tc.steps`` AdamW steps on random batches of ``train``; the batch order depends on ``seed`` only."""
    clf.to(device).train()
    groups = clf.layer_param_groups(tc.lr, tc.weight_decay, tc.layer_decay)
    opt = torch.optim.AdamW(groups, lr=tc.lr, betas=tuple(tc.betas))
    gen = torch.Generator().manual_seed(seed)
    clf.check_data(train)
    losses: list[float] = []
    bar = tqdm(range(tc.steps), desc=desc, disable=not progress, unit="step", dynamic_ncols=True)
    every, t0 = max(1, tc.steps // 10), time.perf_counter()
    for step in bar:
        lr = lr_at(step, tc.lr, tc.warmup_steps, tc.steps, tc.min_lr)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        idx = torch.randint(len(train), (tc.batch_size,), generator=gen)
        src = train.source[idx].to(device)
        lengths = train.lengths[idx] if train.lengths is not None else None
        loss = clf.loss(clf(src, lengths), clf.targets(train, idx), label_smoothing=tc.label_smoothing)
        if not bool(torch.isfinite(loss)):
            raise FloatingPointError(f"{desc}: step {step + 1}: loss is {float(loss)} (not finite)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tc.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(clf.parameters(), tc.clip_norm)
        opt.step()
        losses.append(float(loss.detach()))
        if tracker is not None:
            tracker.log({"train_loss": losses[-1], "lr": lr}, step + 1)
        sps = (step + 1) * tc.batch_size / max(1e-9, time.perf_counter() - t0)
        if progress:
            bar.set_postfix({"loss": f"{losses[-1]:.3f}", "lr": f"{lr:.1e}", "samples/s": f"{sps:.0f}"})
        elif (step + 1) % every == 0 or step + 1 == tc.steps:  # a log (dvc repro, Prefect): ten lines a run
            print(f"{desc}: step {step + 1}/{tc.steps} loss {losses[-1]:.4f} lr {lr:.2e} samples/s {sps:.0f}",
                  flush=True)
    return losses


def make_model(backbone: Data2Vec2, task: str, tc: TaskConfig, num_classes: int) -> Classifier:
    """The fine-tuning model of ``task``: the head ``tc.head`` names (``d2v.models.heads.HEADS``)."""
    return make_head(tc.head, backbone, task, num_classes, freeze_local=tc.freeze_local, pool_norm=tc.pool_norm)


def task_setup(cfg: Config, task: str) -> tuple[Any, TaskConfig, torch.device]:
    """Validate ``cfg``, apply ``finetune.threads``; the finetune section, the task's config, the device."""
    cfg.validate()
    ft = cfg.finetune
    if ft.threads > 0:
        torch.set_num_threads(ft.threads)
    return ft, getattr(ft, task), pick_device(ft.device)


def finetune_task(cfg: Config, task: str, progress: bool = True, inits: tuple[str, ...] = INITS,
                  metrics_path: Path | None = None, history_path: Path | None = None) -> dict[str, FinetuneRun]:
    """Fine-tune the pretrained and the random-init classifier of ``task`` with the same budget."""
    ft, tc, device = task_setup(cfg, task)
    names = label_names(cfg.data.root, task)
    t0 = time.perf_counter()
    train = load_task_data(cfg, task, "train", tc.max_train)
    val = load_task_data(cfg, task, "val", tc.max_eval)
    print(f"{task}: {len(train)} labelled training samples, {len(val)} validation samples "
          f"({len(names)} classes), loaded in {time.perf_counter() - t0:.1f} s", flush=True)
    runs: dict[str, FinetuneRun] = {}
    for init in inits:
        source = "random" if init == "random" else ft.init
        backbone = load_backbone(source, cfg.model, cfg.seed, map_location="cpu")
        if init == "pretrained" and backbone.cfg != cfg.model:
            # The checkpoint's architecture is what we fine-tune; the random baseline must match it.
            cfg.model = backbone.cfg
        torch.manual_seed(cfg.seed + 1)  # the same head init for both
        clf = make_model(backbone, task, tc, len(names))
        tracker = None
        if ft.track:
            from d2v.tracking.mlflow_utils import Tracker

            tracker = Tracker(f"finetune-{task}-{init}", {"task": task, "init": source, **to_dict(cfg)},
                              tags={"stage": "finetune", "task": task, "init": init})
            tracker.log_shards(cfg.data.root, [task], "train")
        start = time.perf_counter()
        try:
            losses = train_classifier(clf, train, tc, cfg.seed, device, progress, f"finetune {task} ({init})", tracker)
            val_acc = accuracy(clf, val, 256, device)
        except BaseException:
            if tracker is not None:
                tracker.finish("FAILED")
            raise
        run = FinetuneRun(init, val_acc, losses, time.perf_counter() - start)
        out = Path(ft.out_dir) / task / init
        save_classifier(clf.cpu(), out, {"task": task, "labels": names, "init": source, "seed": cfg.seed,
                                         "val_accuracy": val_acc, "task_config": asdict(tc)})
        run.out_dir = str(out)
        if tracker is not None:
            tracker.log({"val_accuracy": val_acc}, tc.steps)
            for p in (out / "config.json", out / "weights.pt"):
                tracker.artifact(p, "classifier")
            run.mlflow_run_id = tracker.run_id
            tracker.finish()
        print(f"{task} ({init}): val accuracy {val_acc:.4f}, final train loss {losses[-1]:.4f}, "
              f"{run.seconds:.1f} s", flush=True)
        runs[init] = run
    _write_reports(task, runs, len(train), len(val), metrics_path, history_path)
    return runs


def _write_reports(task: str, runs: dict[str, FinetuneRun], n_train: int, n_val: int,
                   metrics_path: Path | None, history_path: Path | None) -> None:
    if metrics_path is not None:
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        report: dict[str, Any] = {"task": task, "train_samples": n_train, "val_samples": n_val}
        for init, r in runs.items():
            prefix = "" if init == "pretrained" else "baseline_"
            report[f"{prefix}val_accuracy"] = r.val_accuracy
            report[f"{prefix}final_train_loss"] = r.train_loss[-1]
            report[f"{prefix}seconds"] = r.seconds
            report[f"{prefix}mlflow_run_id"] = r.mlflow_run_id
        metrics_path.write_text(json.dumps(report, indent=2))
    if history_path is not None and runs:
        history_path.parent.mkdir(parents=True, exist_ok=True)
        inits = list(runs)
        steps = len(runs[inits[0]].train_loss)
        with open(history_path, "w", newline="") as f:
            w = csv.writer(f, delimiter="\t")
            w.writerow(["step"] + [f"loss_{i}" for i in inits])
            for s in range(steps):
                w.writerow([s + 1] + [f"{runs[i].train_loss[s]:.5f}" for i in inits])

