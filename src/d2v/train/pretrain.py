"""Self-supervised pretraining: setup, one :func:`train_step`, and the loop.

One optimizer step per modality batch, modalities in turn (round robin over ``train.modalities``);
AdamW with fairseq's betas/eps and weight-decay groups; linear warm-up then cosine decay
(:mod:`d2v.train.schedule`); optional clipping and gradient accumulation; bf16 autocast on GPU;
the EMA teacher moved after every optimizer step; the collapse and NaN guards checked every step.

Where the rest lives:

* the method (masking, teacher targets, EMA, decoder, loss): :mod:`d2v.models.data2vec2`;
* the batches and their resumable position: :mod:`d2v.data.streams`;
* checkpoints and RNG state: :mod:`d2v.train.checkpoint`;
* DDP: :mod:`d2v.train.distributed`. Under ``torchrun`` each of the W ranks gets
  ``train.batch_size / W`` samples of the global batch and backpropagates W times its share of the
  global-batch loss (:func:`~d2v.train.distributed.rank_loss`), so the update is the one a single
  process would make on the whole batch. Rank 0 alone shows progress, logs, tracks and writes;
  logged losses and variances are means over ranks, so every rank stops at the same step.

Runtime randomness (dropout, decoder mask noise) is seeded ``seed + rank`` after the model is
initialised from ``seed``; a checkpoint holds every rank's RNG state and the data position, so
``--resume`` continues exactly.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from tqdm import tqdm

from d2v.config import Config, to_dict
from d2v.data.streams import PretrainData
from d2v.errors import InputError
from d2v.io import atomic_save
from d2v.models import CollapseError, Data2Vec2
from d2v.models.baselines import backbone_of, objective
from d2v.models.data2vec2 import compute_var
from d2v.train import checkpoint, distributed
from d2v.train.checkpoint import CHECKPOINT, load_checkpoint
from d2v.train.distributed import DistInfo
from d2v.train.monitor import SpeechFrontEndMonitor
from d2v.train.probe import OnlineProbe
from d2v.train.schedule import lr_at


@dataclass
class PretrainResult:
    steps: int
    first_loss: dict[str, float] = field(default_factory=dict)
    last_loss: dict[str, float] = field(default_factory=dict)
    step_time_s: dict[str, float] = field(default_factory=dict)
    samples_per_s: float = 0.0
    copies_per_s: float = 0.0  # masked copies: samples x clone_batch (data2vec 1/2), samples (MAE, BERT)
    train_seconds: float = 0.0  # wall clock of training, probes excluded
    probe_seconds: float = 0.0  # wall clock of the online probe in this process (its data decoding included)
    probes: list[dict] = field(default_factory=list)
    checkpoint: str = ""
    mlflow_run_id: str = ""
    history: list[dict] = field(default_factory=list)
    world_size: int = 1


@dataclass
class StepStats:
    """What one step reports, as means over ranks."""

    loss: float
    target_var: float
    pred_var: float
    ema_decay: float
    local: list[float] | None = None  # speech: front-end (mean, std, frame std)


def train_step(cfg: Config, info: DistInfo, model: torch.nn.Module, net: torch.nn.Module, opt: torch.optim.Optimizer,
               data: PretrainData, modality: str, step: int, use_bf16: bool,
               monitor: SpeechFrontEndMonitor) -> StepStats:
    """One optimizer step on ``modality`` (``grad_accum`` micro-batches), then the EMA teacher update
    (fairseq's ``Data2VecMultiModel.set_num_updates``) and the collapse / NaN guards.

    ``model`` is a ``Data2Vec2`` or one of the baselines of :mod:`d2v.models.baselines`; MAE and BERT
    draw their own masks (MAE's random 75%, BERT's 15% of real tokens), the others take the loader's."""
    t = cfg.train
    device = info.device
    monitor.start_step()
    opt.zero_grad(set_to_none=True)
    losses = []
    for micro in range(t.grad_accum):
        batch = data.next_batch(modality, step, micro)
        # Mask and padding stay on the CPU: the model checks them there (no device sync); the
        # source's values are checked here, before the transfer, for the same reason.
        model.encoder(modality).check_input(batch.source)
        src = batch.source.to(device, non_blocking=True)
        last = micro == t.grad_accum - 1
        sync = contextlib.nullcontext() if last or not info.distributed else net.no_sync()
        with sync:
            kw = {"mask": batch.mask if t.objective in ("data2vec2", "data2vec1") else None}
            if batch.padding_mask is not None:
                kw["padding_mask"] = batch.padding_mask
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                out = net(src, modality, **kw)
            loss = distributed.rank_loss(out, info.world_size)
            (loss / t.grad_accum).backward()
        losses.append(loss.detach())
    if t.clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_norm)
    opt.step()
    decay = model.update_teacher(step + 1)
    # One collective for what is logged and guarded: means over ranks.
    parts = [torch.stack(losses).mean().float(), *_variances(out)]
    local = monitor.stats() if modality == "speech" else None
    if local is not None:
        parts += list(local.to(parts[0].device))
    stats = torch.stack(parts)
    distributed.all_reduce_mean(stats)
    health = SimpleNamespace(loss=stats[0], target_var=stats[1], pred_var=stats[2])
    if isinstance(model, Data2Vec2):
        model.check_collapse(health, step + 1)
    elif not bool(torch.isfinite(stats[0])):  # the baselines: the NaN/Inf guard only
        raise CollapseError(f"step {step + 1}: loss is {float(stats[0])} (not finite)")
    loss_v, tvar, pvar, *local_v = (float(v) for v in stats.tolist())
    return StepStats(loss_v, tvar, pvar, decay, local_v or None)


def _variances(out) -> list[torch.Tensor]:
    """Target and prediction variance (fairseq ``compute_var``); a baseline's from its pred/target
    (NaN where the target is not a float, BERT's token ids)."""
    if getattr(out, "target_var", None) is not None:
        return [out.target_var.float(), out.pred_var.float()]
    nan = out.loss.detach().new_full((), float("nan"))
    if not out.target.is_floating_point():
        return [nan, nan]
    return [compute_var(out.target.detach()), compute_var(out.pred.detach())]


def pretrain(cfg: Config, resume: bool | str | Path = False, progress: bool = True,
             metrics_path: Path | None = None, history_path: Path | None = None,
             stop_after: int | None = None, probe_path: Path | None = None) -> PretrainResult:
    """Pretrain ``cfg``, in one process or under torchrun (DDP).

    ``resume``: ``True`` continues from ``<train.out_dir>/checkpoint.pt`` if it exists (from step 0,
    with a note, if not); a path continues from that checkpoint (an ``InputError`` if missing).
    ``stop_after`` ends the run early after that step's checkpoint (an interruption, for tests).
    ``probe_path``: the online probe's TSV (step, train_seconds, modality, accuracy).
    """
    cfg.validate()
    with distributed.process_group(cfg.train.device) as info:
        return _pretrain(cfg, info, resume, progress and info.is_main, metrics_path, history_path, stop_after,
                         probe_path)


def _pretrain(cfg: Config, info: DistInfo, resume, progress: bool, metrics_path, history_path,
              stop_after: int | None, probe_path: Path | None) -> PretrainResult:
    t = cfg.train
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    if t.threads > 0:
        torch.set_num_threads(t.threads)
    device = info.device
    use_bf16 = t.precision == "bf16" or (t.precision == "auto" and device.type == "cuda")

    model = objective(t.objective, cfg.model).to(device)
    backbone = backbone_of(model)  # the Data2Vec2 encoder every objective trains
    opt = torch.optim.AdamW(model.param_groups(t.weight_decay), lr=t.lr, betas=tuple(t.betas), eps=t.eps,
                            fused=device.type == "cuda")
    out_dir = Path(t.out_dir)
    ckpt_path = out_dir / CHECKPOINT
    start, state = 0, None
    path = checkpoint.resume_path(resume, ckpt_path, info.is_main)
    if path is not None:
        state = load_checkpoint(path, cfg, map_location=device)
        try:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            msg = (str(e).strip().splitlines() or [""])[0][:300]
            raise InputError(f"{path}: cannot restore the model/optimizer (written for another "
                             f"train.objective?): {msg}") from e
        start = int(state["step"])
        if info.is_main:
            print(f"resumed from {path} at step {start}", flush=True)
            checkpoint.note_resume_differences(state, cfg, start, info.world_size)
    checkpoint.restore_rng(state, cfg, info)
    from d2v.train.compile import compile_enabled, compile_model  # train.compile: the step through torch.compile

    compile_model(model, compile_enabled(t.compile, device))  # before DDP wraps it; eager, with one warning, if it fails
    net = distributed.wrap_ddp(model, info)
    data = PretrainData(cfg, info.rank, info.world_size)
    probing = bool(t.probe_every or t.probe_every_minutes)
    probe = OnlineProbe(cfg, device) if probing and info.is_main else None
    budget_s = t.max_minutes * 60.0
    trained_s = float(state.get("train_seconds", 0.0)) if state is not None else 0.0  # before this process

    def save(step: int, seconds: float | None = None) -> None:
        ckpt = checkpoint.checkpoint_state(model, opt, cfg, step, info)
        if ckpt is None:
            return
        ckpt["train_seconds"] = trained_s + clock() if seconds is None else seconds
        atomic_save(ckpt, ckpt_path)
        if t.keep_every and step % t.keep_every == 0:  # a kept copy, beside the one that is overwritten
            kept = out_dir / f"checkpoint_{step}.pt"
            kept.unlink(missing_ok=True)
            os.link(ckpt_path, kept)

    result = PretrainResult(steps=t.max_steps, world_size=info.world_size)
    tracker = None
    if t.track and info.is_main:
        from d2v.tracking.mlflow_utils import Tracker

        tracker = Tracker("pretrain", to_dict(cfg), tags={"stage": "pretrain", "objective": t.objective,
                                                          "resumed_from": str(start),
                                                          "world_size": str(info.world_size)})
        result.mlflow_run_id = tracker.run_id
        if cfg.data.source == "shards":  # what trained it, in the runs table's Dataset column
            tracker.log_shards(cfg.data.root, t.modalities, "train")

    def clock() -> float:  # training seconds of this process, probes excluded
        return time.perf_counter() - t_start - (probe.seconds if probe is not None else 0.0)

    def run_probe(step: int) -> None:
        accs = probe(backbone)
        secs = trained_s + clock()
        for m, acc in accs.items():
            result.probes.append({"step": step, "train_seconds": round(secs, 3), "modality": m, "accuracy": acc})
        if tracker is not None:
            tracker.log({f"probe/{m}": acc for m, acc in accs.items()} | {"train_seconds": secs}, step)
        # tqdm.write: above the progress bar, not through it
        tqdm.write(f"probe at step {step} ({secs:.0f} s of training, {probe.seconds + probe.load_seconds:.0f} s of "
                   f"probing so far): " + ", ".join(f"{m} {a:.3f}" for m, a in accs.items()))

    # ------------------------------------------------------------------ the loop
    times: dict[str, list[float]] = {m: [] for m in t.modalities}
    n_samples, t_start = 0, time.perf_counter()
    copies = cfg.model.clone_batch if t.objective in ("data2vec2", "data2vec1") else 1
    last_good = start if start > 0 and ckpt_path.exists() else None  # step of the checkpoint on disk
    monitor = SpeechFrontEndMonitor(backbone, enabled="speech" in t.modalities)
    end = t.max_steps if stop_after is None else min(t.max_steps, stop_after)
    done = start
    model.train()
    if probe is not None and start == 0:
        run_probe(0)
    # train.probe_every_minutes: the next probe at the next multiple of the gap in training seconds
    probe_gap_s = t.probe_every_minutes * 60.0
    next_probe_s = (math.floor(trained_s / probe_gap_s) + 1) * probe_gap_s if probe_gap_s else 0.0
    bar = tqdm(range(start, t.max_steps), initial=start, total=t.max_steps, disable=not progress,
               desc="pretrain", unit="step", dynamic_ncols=True)
    try:
        for step in bar:
            modality = t.modalities[step % len(t.modalities)]
            # a time budget runs the schedule over the minutes instead of the steps
            at = step if not budget_s else int(t.max_steps * min(1.0, (trained_s + clock()) / budget_s))
            lr = lr_at(at, t.lr, t.warmup_steps, t.max_steps, t.min_lr)
            for group in opt.param_groups:
                group["lr"] = lr
            t0 = time.perf_counter()
            try:
                s = train_step(cfg, info, model, net, opt, data, modality, step, use_bf16, monitor)
            except CollapseError as e:
                kept = (f"the last good checkpoint is {ckpt_path} (step {last_good})" if last_good is not None
                        else "no checkpoint was written before it")
                raise CollapseError(f"pretraining stopped ({modality} batch): {e}; {kept}") from e
            dt = time.perf_counter() - t0
            done = step + 1
            times[modality].append(dt)
            n_samples += t.batch_size * t.grad_accum  # global
            result.first_loss.setdefault(modality, s.loss)
            result.last_loss[modality] = s.loss
            row = {"step": done, "modality": modality, "loss": s.loss, "lr": lr,
                   "ema_decay": s.ema_decay, "target_var": s.target_var, "pred_var": s.pred_var,
                   "step_time_s": dt}
            if "speech" in t.modalities:  # the same columns on every row (the history is a TSV)
                row["local_mean"], row["local_std"], row["local_frame_std"] = s.local or (float("nan"),) * 3
                if s.local and info.is_main:
                    monitor.check(done, *s.local)
            result.history.append(row)
            out_of_time = bool(budget_s) and distributed.broadcast_object(trained_s + clock() >= budget_s)
            last = done >= end or out_of_time
            if info.is_main:
                sps = n_samples / max(1e-9, clock())
                _log_step(t, tracker, bar, progress, row, s, sps, sps * copies)
            if probe is not None and (last or (t.probe_every and done % t.probe_every == 0)
                                      or (probe_gap_s and trained_s + clock() >= next_probe_s)):
                run_probe(done)
                next_probe_s = (math.floor((trained_s + clock()) / probe_gap_s) + 1) * probe_gap_s if probe_gap_s else 0.0
                bar.unpause()  # the bar's rate and ETA leave the probe's seconds out, as train_seconds does
            if t.ckpt_every and done % t.ckpt_every == 0 and not last:
                save(done)
                last_good = done
            if last:
                break
        bar.close()
        own_s = clock()  # stopped before the save: the checkpoint and the result report the same seconds
        save(max(start, done), trained_s + own_s)
    except BaseException:
        if tracker is not None:
            tracker.finish("FAILED")
        raise
    finally:
        bar.close()
        monitor.close()
    result.checkpoint = str(ckpt_path)
    result.steps = max(start, done)
    result.train_seconds = trained_s + own_s
    if probe is not None:
        result.probe_seconds = probe.seconds + probe.load_seconds
    if stop_after is None:
        result.samples_per_s = n_samples / max(1e-9, own_s)
        result.copies_per_s = result.samples_per_s * copies
        for m, ts in times.items():
            if ts:  # median step time, skipping the first (warm-up) step
                srt = sorted(ts[1:] or ts)
                result.step_time_s[m] = srt[len(srt) // 2]
    if info.is_main:
        _finish(cfg, result, out_dir, ckpt_path, metrics_path, history_path, probe_path, tracker,
                interrupted=stop_after is not None)
    distributed.barrier()  # every rank returns after rank 0's files exist
    return result


def _log_step(t: Any, tracker: Any, bar: tqdm, progress: bool, row: dict, s: StepStats, sps: float,
              cps: float) -> None:
    m, step = row["modality"], row["step"]
    if tracker is not None:
        logged = {f"{m}/loss": s.loss, f"{m}/target_var": s.target_var, f"{m}/pred_var": s.pred_var,
                  "lr": row["lr"], "ema_decay": row["ema_decay"], "samples_per_s": sps, "copies_per_s": cps}
        if s.local:
            logged.update({"speech/local_mean": s.local[0], "speech/local_std": s.local[1],
                           "speech/local_frame_std": s.local[2]})
        tracker.log(logged, step)
    if progress:
        bar.set_postfix({"modality": m, "loss": f"{s.loss:.3f}", "lr": f"{row['lr']:.1e}", "samples/s": f"{sps:.1f}"})
    elif t.log_every and step % t.log_every == 0:
        print(f"step {step}/{t.max_steps} {m} loss {s.loss:.4f} lr {row['lr']:.2e} "
              f"tvar {s.target_var:.3f} pvar {s.pred_var:.3f} samples/s {sps:.1f} copies/s {cps:.1f}", flush=True)


def _finish(cfg: Config, result: PretrainResult, out_dir: Path, ckpt_path: Path, metrics_path: Path | None,
            history_path: Path | None, probe_path: Path | None, tracker: Any, interrupted: bool) -> None:
    """Rank 0: the run's config, metrics JSON, loss and probe TSVs and MLflow artifacts (an
    interrupted run writes only its checkpoint)."""
    if not interrupted:
        (out_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    if tracker is not None:
        for p in (ckpt_path, out_dir / "config.json"):
            if p.exists():
                tracker.artifact(p, "pretrain")
    if not interrupted:
        _write_reports(cfg, result, metrics_path, history_path, probe_path)
    if tracker is not None:
        for p in (metrics_path, history_path, probe_path):
            if p is not None and p.exists():
                tracker.artifact(p, "reports")
        if result.history:  # the loss curve as a picture on the run's page (the report draws the same)
            from d2v.report.curves import loss_figure

            tracker.figure(loss_figure(result.history), "plots/pretrain_loss.png")
        tracker.finish()


def _write_tsv(path: Path, rows: list[dict], columns: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, delimiter="\t")
        w.writeheader()
        w.writerows(rows)


def _write_reports(cfg: Config, result: PretrainResult, metrics_path: Path | None,
                   history_path: Path | None, probe_path: Path | None) -> None:
    if metrics_path is not None:
        final_probe = {r["modality"]: r["accuracy"] for r in result.probes if r["step"] == result.steps}
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text(json.dumps({
            "objective": cfg.train.objective,
            "steps": result.steps,
            "first_loss": result.first_loss,
            "final_loss": result.last_loss,
            "median_step_time_s": result.step_time_s,
            "samples_per_s": result.samples_per_s,
            "copies_per_s": result.copies_per_s,
            "train_seconds": result.train_seconds,
            "probe": final_probe,
            "probe_seconds": result.probe_seconds,
            "world_size": result.world_size,
            "mlflow_run_id": result.mlflow_run_id,
        }, indent=2))
    if history_path is not None and result.history:
        _write_tsv(history_path, result.history, list(result.history[0]))
    if probe_path is not None:  # always written (a header alone when the probe is off): a DVC plot
        _write_tsv(probe_path, result.probes, ["step", "train_seconds", "modality", "accuracy"])
