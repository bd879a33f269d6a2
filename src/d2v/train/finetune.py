"""Fine-tuning: one downstream classifier per modality on the pretrained (or a random) encoder.

The classifier is the student's encoder path of one modality (local encoder, context encoder,
shared blocks; decoder and teacher dropped), mean-pooled over the real tokens (extra tokens and
padding excluded), then LayerNorm(eps 1e-6) and a Linear head (trunc-normal 0.02, zero bias):
the spec's §6 image recipe, used for all three modalities here. ``pool_norm="batch"`` swaps the
LayerNorm for a BatchNorm without affine (per-feature standardisation, as MAE's linear probe):
on the tiny speech model the pooled features are dominated by a few near-constant directions
that a LayerNorm keeps, and the head then barely learns (BENCHMARKS.md "Downstream tasks"). AdamW with layer-wise learning-rate
decay (the local/context encoder is layer 0, block i is layer i+1, the head layer depth+1), linear
warm-up then cosine, label smoothing.

``finetune_task`` trains the pretrained and the random-init model with the same budget, seed and
batches, saves both as classifier folders and reports validation accuracy.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from d2v.config import Config, TaskConfig, to_dict
from d2v.errors import InputError
from d2v.models import Data2Vec2
from d2v.models.blocks import run_blocks
from d2v.models.config import ModelConfig
from d2v.models.export import model_config_from_dict, save_torch
from d2v.train.downstream_data import LabelledSplit, label_names, load_split
from d2v.train.pretrain import lr_at, pick_device

CLASSIFIER_FORMAT = "d2v-classifier/1"
INITS = ("pretrained", "random")


class Classifier(nn.Module):
    """``model(source, padding_mask=None) -> logits``; ``features(...)`` gives the pooled vector."""

    head_kind = "classify"  # "ctc": d2v.train.ctc.CTCRecognizer

    def __init__(self, backbone: Data2Vec2, modality: str, num_classes: int, freeze_local: bool = False,
                 pool_norm: str = "layer"):
        super().__init__()
        if modality not in backbone.modality_encoders:
            raise InputError(f"the model has no {modality!r} encoder (it has {', '.join(backbone.modality_encoders)})")
        self.modality = modality
        self.model_cfg = backbone.cfg
        self.encoder = backbone.modality_encoders[modality]
        self.encoder.decoder = None  # the pretraining decoder is not part of the classifier
        if freeze_local:  # no gradient, so no backward pass through the (speech CNN) local encoder
            self.encoder.local_encoder.requires_grad_(False)
        self.blocks = backbone.blocks
        self.layerdrop = backbone.cfg.layerdrop
        d = backbone.cfg.embed_dim
        if pool_norm not in ("layer", "batch"):
            raise InputError(f"pool_norm must be 'layer' or 'batch', got {pool_norm!r}")
        self.pool_norm = pool_norm
        self.fc_norm = nn.LayerNorm(d, eps=1e-6) if pool_norm == "layer" else nn.BatchNorm1d(d, affine=False)
        self.head = nn.Linear(d, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def token_padding(self, source: torch.Tensor, lengths: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Token-level padding (True = pad) from per-sample lengths (speech samples, text tokens)."""
        if lengths is None:
            return None
        if self.modality == "speech":
            frames = torch.tensor([self.encoder.local_encoder.output_length(int(n)) for n in lengths])
            t = self.encoder.num_tokens(tuple(source.shape))
        else:
            frames, t = lengths.cpu(), source.shape[1]
        return torch.arange(t).unsqueeze(0) >= frames.unsqueeze(1)

    def token_features(self, source: torch.Tensor, lengths: Optional[torch.Tensor] = None
                       ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Last-block output per token (extra tokens dropped), (B, T, D), and the padding mask."""
        enc = self.encoder
        enc.check_input(source)
        pad = Data2Vec2._padding(enc, source, self.token_padding(source, lengths))
        ctx = enc.contextualize(enc.local_features(source), padding_mask=pad)
        x, _ = run_blocks(self.blocks, ctx.x, ctx.bias, self.layerdrop)
        return x[:, enc.num_extra_tokens:], pad

    def features(self, source: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        x, pad = self.token_features(source, lengths)
        if pad is None:
            return x.mean(1)
        keep = (~pad).unsqueeze(-1).to(x.dtype)
        return (x * keep).sum(1) / keep.sum(1).clamp_min(1)

    def forward(self, source: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.head(self.fc_norm(self.features(source, lengths)))

    def layer_param_groups(self, lr: float, weight_decay: float, layer_decay: float) -> list[dict]:
        """AdamW groups with lr x layer_decay^(depth + 1 - layer); no decay on 1-D/bias tensors."""
        depth = len(self.blocks)
        groups: dict[tuple[int, bool], dict] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if name.startswith("blocks."):
                layer = int(name.split(".")[1]) + 1
            elif name.startswith(("fc_norm.", "head.")):
                layer = depth + 1
            else:
                layer = 0
            no_wd = p.ndim <= 1 or name.endswith(".bias") or "alibi_scale" in name
            g = groups.setdefault((layer, no_wd), {
                "params": [], "weight_decay": 0.0 if no_wd else weight_decay,
                "lr_scale": layer_decay ** (depth + 1 - layer), "layer": layer,
            })
            g["params"].append(p)
        return list(groups.values())


# ------------------------------------------------------------------------------ backbones
def load_backbone(init: str, model_cfg: ModelConfig, seed: int, map_location: str = "cpu") -> Data2Vec2:
    """``init`` = ``random`` (a fresh model from ``model_cfg``, seeded) or a path to a pretrained
    checkpoint / model folder."""
    if init == "random":
        torch.manual_seed(seed)
        return Data2Vec2(model_cfg)
    from d2v.models.export import load_model_dir

    model, _ = load_model_dir(init, map_location=map_location)
    return model


# ------------------------------------------------------------------------------ save / load
def save_classifier(clf: Classifier, out_dir: Path, meta: dict[str, Any]) -> Path:
    """``config.json`` (model config, task, labels) + ``weights.pt`` (state dict); atomic rename."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_torch(clf.state_dict(), tmp / "weights.pt")  # a full disk is a clear OSError naming the file
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    cfg = {"format": CLASSIFIER_FORMAT, "model": asdict(clf.model_cfg), "modality": clf.modality,
           "num_classes": clf.head.out_features, "pool_norm": clf.pool_norm, "head": clf.head_kind, **meta}
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def load_classifier(path: str | Path, map_location: str = "cpu") -> tuple[Classifier, dict]:
    path = Path(path)
    cfg_path, w_path = path / "config.json", path / "weights.pt"
    if not cfg_path.is_file() or not w_path.is_file():
        raise InputError(f"{path}: not a classifier folder (needs config.json and weights.pt; run `d2v finetune`)")
    try:
        meta = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{cfg_path}: not valid JSON: {e}") from e
    if meta.get("format") != CLASSIFIER_FORMAT:
        raise InputError(f"{cfg_path}: format {meta.get('format')!r}, expected {CLASSIFIER_FORMAT!r}")
    backbone = Data2Vec2(model_config_from_dict(meta["model"]))
    if meta.get("head", "classify") == "ctc":
        from d2v.train.ctc import CTCRecognizer

        clf: Classifier = CTCRecognizer(backbone)
    else:
        clf = Classifier(backbone, meta["modality"], int(meta["num_classes"]), pool_norm=meta.get("pool_norm", "layer"))
    try:
        state = torch.load(w_path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated zip, bad pickle opcode, ...
        raise InputError(f"{w_path}: cannot read weights ({type(e).__name__}: {e})") from e
    # Only the student path is kept: drop the teacher and decoders of the throwaway backbone.
    missing, unexpected = clf.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InputError(f"{w_path}: weights do not match config.json: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return clf, meta


# ------------------------------------------------------------------------------ training
@torch.no_grad()
def predict(clf: Classifier, data: LabelledSplit, batch_size: int, device: torch.device) -> torch.Tensor:
    """Predicted class per sample (eval mode, batched)."""
    clf.eval()
    out = []
    for i in range(0, len(data), batch_size):
        src = data.source[i : i + batch_size].to(device)
        lengths = data.lengths[i : i + batch_size] if data.lengths is not None else None
        out.append(clf(src, lengths).argmax(-1).cpu())
    return torch.cat(out)


def accuracy(clf: Classifier, data: LabelledSplit, batch_size: int, device: torch.device) -> float:
    """Classification accuracy; for a CTC model, word accuracy (1 - WER)."""
    if clf.head_kind == "ctc":
        from d2v.train.ctc import transcribe_split

        return 1.0 - transcribe_split(clf, data, batch_size, device)["wer"]
    return float((predict(clf, data, batch_size, device) == data.label).float().mean())


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
    if clf.head_kind == "ctc":
        from d2v.train.ctc import check_split, ctc_loss

        check_split(train)
    losses: list[float] = []
    bar = tqdm(range(tc.steps), desc=desc, disable=not progress, unit="step", dynamic_ncols=True)
    for step in bar:
        lr = lr_at(step, tc.lr, tc.warmup_steps, tc.steps, tc.min_lr)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        idx = torch.randint(len(train), (tc.batch_size,), generator=gen)
        src = train.source[idx].to(device)
        lengths = train.lengths[idx] if train.lengths is not None else None
        if clf.head_kind == "ctc":
            loss = ctc_loss(clf(src, lengths), clf.frames(src, lengths), [train.texts[i] for i in idx.tolist()],
                            [train.keys[i] for i in idx.tolist()])
        else:
            loss = F.cross_entropy(clf(src, lengths), train.label[idx].to(device), label_smoothing=tc.label_smoothing)
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
        if progress:
            bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{lr:.1e}")
    return losses


def make_model(backbone: Data2Vec2, task: str, tc: TaskConfig, num_classes: int) -> Classifier:
    """The fine-tuning model of ``task``: a ``Classifier``, or for ``head: ctc`` a CTC recogniser."""
    if tc.head == "ctc":
        from d2v.train.ctc import CTCRecognizer

        return CTCRecognizer(backbone, freeze_local=tc.freeze_local)
    return Classifier(backbone, task, num_classes, freeze_local=tc.freeze_local, pool_norm=tc.pool_norm)


def load_task_data(cfg: Config, task: str, split: str, max_n: int) -> LabelledSplit:
    tc: TaskConfig = getattr(cfg.finetune, task)
    m = cfg.model
    kw: dict[str, Any] = {}
    if task == "image":
        if m.image is None:
            raise InputError("model.image is not configured: cannot run the image task")
        kw = {"image_size": m.image.input_size, "in_chans": m.image.in_chans}
    elif task == "speech":
        if m.speech is None:
            raise InputError("model.speech is not configured: cannot run the speech task")
        kw = {"sample_rate": m.speech.sample_rate, "audio_seconds": tc.audio_seconds}
    else:
        if m.text is None:
            raise InputError("model.text is not configured: cannot run the text task")
        kw = {"text_length": min(tc.text_length, m.text.max_source_positions)}
    return load_split(cfg.data.root, task, split, max_n, **kw)


def task_setup(cfg: Config, task: str) -> tuple[Any, TaskConfig, torch.device]:
    """Validate ``cfg``, apply ``finetune.threads``; the finetune section, the task's config, the device."""
    cfg.validate()
    ft = cfg.finetune
    if ft.threads > 0:
        torch.set_num_threads(ft.threads)
    return ft, getattr(ft, task), pick_device(ft.device)


def finetune_task(cfg: Config, task: str, progress: bool = True, inits: tuple[str, ...] = INITS,
                  metrics_path: Optional[Path] = None, history_path: Optional[Path] = None) -> dict[str, FinetuneRun]:
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
                   metrics_path: Optional[Path], history_path: Optional[Path]) -> None:
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

