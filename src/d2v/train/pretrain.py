"""Self-supervised pretraining loop.

One optimizer step per modality batch, modalities in turn (round robin over
``train.modalities``); AdamW with the spec's betas/eps and weight-decay groups; linear warm-up
then cosine decay; optional clipping and gradient accumulation; bf16 autocast on GPU; the EMA
teacher moved after every optimizer step; the collapse and NaN guards checked every step.

Batches and masks are a pure function of ``(seed, step)``, and checkpoints hold the model
(student + teacher), optimizer, scheduler and step, so ``--resume`` continues exactly.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from d2v.config import Config, to_dict
from d2v.data.sample import SampleData, step_generator
from d2v.models import Data2Vec2

CHECKPOINT = "checkpoint.pt"


@dataclass
class PretrainResult:
    steps: int
    first_loss: dict[str, float] = field(default_factory=dict)
    last_loss: dict[str, float] = field(default_factory=dict)
    step_time_s: dict[str, float] = field(default_factory=dict)
    samples_per_s: float = 0.0
    checkpoint: str = ""
    mlflow_run_id: str = ""
    history: list[dict] = field(default_factory=list)


def lr_at(step: int, base: float, warmup: int, total: int, min_lr: float = 0.0) -> float:
    """Linear warm-up from 0 to ``base`` over ``warmup`` steps, then cosine to ``min_lr``."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def atomic_save(obj: dict, path: Path) -> None:
    """Write to a temp file in the same folder, then rename: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _state(model, opt, step: int, cfg: Config) -> dict:
    return {
        "model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "config": to_dict(cfg),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def pretrain(cfg: Config, resume: bool = False, progress: bool = True,
             metrics_path: Optional[Path] = None, history_path: Optional[Path] = None,
             stop_after: Optional[int] = None) -> PretrainResult:
    """Pretrain ``cfg``; ``stop_after`` ends the run early after that step's checkpoint
    (an interruption, for tests); ``resume`` continues from the checkpoint in ``train.out_dir``."""
    cfg.validate()
    t = cfg.train
    torch.manual_seed(cfg.seed)
    if t.threads > 0:
        torch.set_num_threads(t.threads)
    device = pick_device(t.device)
    use_bf16 = t.precision == "bf16" or (t.precision == "auto" and device.type == "cuda")

    model = Data2Vec2(cfg.model).to(device)
    opt = torch.optim.AdamW(
        model.param_groups(t.weight_decay), lr=t.lr, betas=tuple(t.betas), eps=t.eps,
        fused=device.type == "cuda",
    )
    out_dir = Path(t.out_dir)
    ckpt_path = out_dir / CHECKPOINT
    start = 0
    if resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = int(state["step"])
        torch.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        print(f"resumed from {ckpt_path} at step {start}")
    elif resume:
        print(f"--resume: no checkpoint at {ckpt_path}, starting from step 0")

    if cfg.data.source == "sample":
        data = SampleData(cfg.model, t.modalities, cfg.data.num_samples, cfg.seed,
                          cfg.data.audio_seconds, cfg.data.text_length)
        streams = None
    else:
        # Shards: one resampled stream per modality, masks drawn in the loader. The stream is
        # re-seeded from the step on resume, so a resumed run sees fresh (not identical) batches.
        from d2v.data.loaders import make_train_loader

        data = None
        per_mod = math.ceil((t.max_steps - start) / len(t.modalities)) * t.grad_accum + 1
        streams = {m: iter(make_train_loader(cfg, m, t.batch_size, per_mod, cfg.seed + start)) for m in t.modalities}
    result = PretrainResult(steps=t.max_steps)
    tracker = None
    if t.track:
        from d2v.tracking.mlflow_utils import Tracker

        tracker = Tracker("pretrain", to_dict(cfg), tags={"stage": "pretrain", "resumed_from": str(start)})
        result.mlflow_run_id = tracker.run_id
    try:
        _loop_and_save(cfg, model, opt, data, streams, start, device, use_bf16, ckpt_path, out_dir, result,
                       progress, stop_after, tracker)
    except BaseException:
        if tracker is not None:
            tracker.finish("FAILED")
        raise
    if tracker is not None:
        for p in (ckpt_path, out_dir / "config.json"):
            if p.exists():
                tracker.artifact(p, "pretrain")
    if stop_after is None:
        _write_reports(cfg, result, metrics_path, history_path, tracker)
    if tracker is not None:
        for p in (metrics_path, history_path):
            if p is not None and p.exists():
                tracker.artifact(p, "reports")
        tracker.finish()
    return result


def _loop_and_save(cfg, model, opt, data, streams, start, device, use_bf16, ckpt_path, out_dir, result,
                   progress, stop_after, tracker) -> None:
    t = cfg.train
    times: dict[str, list[float]] = {m: [] for m in t.modalities}
    history: list[dict] = []
    n_samples, t_start = 0, time.perf_counter()

    model.train()
    bar = tqdm(range(start, t.max_steps), initial=start, total=t.max_steps, disable=not progress,
               desc="pretrain", unit="step", dynamic_ncols=True)
    for step in bar:
        modality = t.modalities[step % len(t.modalities)]
        lr = lr_at(step, t.lr, t.warmup_steps, t.max_steps, t.min_lr)
        for group in opt.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        losses = []
        for micro in range(t.grad_accum):
            enc = model.encoder(modality)
            if streams is None:
                src = data.batch(modality, step * t.grad_accum + micro, t.batch_size)
                length = enc.num_tokens(tuple(src.shape))
                gen = step_generator(cfg.seed, step * t.grad_accum + micro, salt=17)
                mask = enc.make_mask(t.batch_size * cfg.model.clone_batch, length, torch.device("cpu"), gen)
            else:
                batch = next(streams[modality])
                src, mask = batch.source, batch.mask
            # Mask and padding stay on the CPU: the model checks them there (no device sync).
            pad = src.eq(cfg.model.text.pad_idx) if modality == "text" else None
            src = src.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                out = model(src, modality, mask=mask, padding_mask=pad)
            (out.loss / t.grad_accum).backward()
            losses.append(out.loss.detach())
        if t.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_norm)
        opt.step()
        decay = model.update_teacher(step + 1)
        loss = float(torch.stack(losses).mean())
        model.check_collapse(out, step + 1)
        dt = time.perf_counter() - t0
        times[modality].append(dt)
        n_samples += t.batch_size * t.grad_accum
        result.first_loss.setdefault(modality, loss)
        result.last_loss[modality] = loss
        row = {"step": step + 1, "modality": modality, "loss": loss, "lr": lr, "ema_decay": decay,
               "target_var": float(out.target_var), "pred_var": float(out.pred_var), "step_time_s": dt}
        history.append(row)
        if tracker is not None:
            tracker.log({f"{modality}/loss": loss, f"{modality}/target_var": row["target_var"],
                         f"{modality}/pred_var": row["pred_var"], "lr": lr, "ema_decay": decay,
                         "samples_per_s": n_samples / (time.perf_counter() - t_start)}, step + 1)
        if progress:
            bar.set_postfix(mod=modality[:2], loss=f"{loss:.3f}", lr=f"{lr:.1e}",
                            sps=f"{n_samples / (time.perf_counter() - t_start):.1f}")
        elif t.log_every and (step + 1) % t.log_every == 0:
            print(f"step {step + 1}/{t.max_steps} {modality} loss {loss:.4f} lr {lr:.2e} "
                  f"tvar {row['target_var']:.3f} pvar {row['pred_var']:.3f}", flush=True)
        if t.ckpt_every and (step + 1) % t.ckpt_every == 0 and step + 1 < t.max_steps:
            atomic_save(_state(model, opt, step + 1, cfg), ckpt_path)
        if stop_after is not None and step + 1 >= stop_after:
            atomic_save(_state(model, opt, step + 1, cfg), ckpt_path)
            bar.close()
            result.checkpoint = str(ckpt_path)
            return
    bar.close()

    result.samples_per_s = n_samples / max(1e-9, time.perf_counter() - t_start)
    for m, ts in times.items():
        if ts:  # median step time, skipping the first (warm-up) step
            s = sorted(ts[1:] or ts)
            result.step_time_s[m] = s[len(s) // 2]
    atomic_save(_state(model, opt, t.max_steps, cfg), ckpt_path)
    result.checkpoint = str(ckpt_path)
    (out_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    result.history = history


def _write_reports(cfg, result, metrics_path, history_path, tracker) -> None:
    t = cfg.train
    history = result.history
    if metrics_path is not None:
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text(json.dumps({
            "steps": t.max_steps,
            "first_loss": result.first_loss,
            "final_loss": result.last_loss,
            "median_step_time_s": result.step_time_s,
            "samples_per_s": result.samples_per_s,
            "mlflow_run_id": result.mlflow_run_id,
        }, indent=2))
    if history_path is not None and history:
        history_path.parent.mkdir(parents=True, exist_ok=True)
        with open(history_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(history[0]), delimiter="\t")
            w.writeheader()
            w.writerows(history)
