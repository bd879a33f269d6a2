"""Fine-tuning: one downstream head per modality on the pretrained (or a random) encoder.

The heads (``d2v.models.heads``): a ``Classifier`` (mean-pooled features -> norm -> Linear, the
fairseq ``MaeImageClassificationModel``'s recipe, for all three modalities) or, for ``finetune.speech.head=ctc``, a
``CTCRecognizer``; each brings its loss and its scores, so this loop is the same for both. AdamW
with layer-wise learning-rate decay (the local/context encoder is layer 0, block i is layer i+1,
the head layer depth+1), linear warm-up then cosine, label smoothing (classification).
``pool_norm="batch"`` swaps the Classifier's LayerNorm for a BatchNorm without affine: on the tiny
speech model the pooled features are dominated by a few near-constant directions that a LayerNorm
keeps, and the head then barely learns (BENCHMARKS.md "Downstream tasks").

Data are streamed from the shards (:func:`d2v.data.downstream.train_batches`), so memory does not
grow with the split. ``finetune_task`` trains the pretrained and the random-init model with the
same budget, seed and batches, saves both as classifier folders (``d2v.models.classifier_dir``)
and reports validation accuracy (for CTC: word accuracy, 1 - WER).

Scale: under ``torchrun`` every process reads the same global batches and trains on its rows
(DDP; nccl on GPUs, gloo on the CPU), bf16 autocast on GPU (``finetune.precision``), rank 0 alone
tracks and writes. With ``finetune.ckpt_every`` > 0 a checkpoint per init
(``<out_dir>/<task>/checkpoints/<init>.pt``) is written every that many steps; ``--resume``
continues from it exactly: the data stream is re-created at checkpoint boundaries, as in pretraining
(:mod:`d2v.data.streams`), and the RNG, optimizer and loss history are restored.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from d2v.config import Config, TaskConfig, to_dict
from d2v.data.downstream import eval_batches, label_names, split_size, task_inputs, train_batches
from d2v.data.streams import segment_start
from d2v.errors import ConfigError, InputError
from d2v.io import atomic_save, torch_load_checked
from d2v.models import Data2Vec2
from d2v.models.classifier_dir import save_classifier
from d2v.models.config import ModelConfig
from d2v.models.heads import Classifier, FrameMasking, frame_mask_seeds, make_head
from d2v.train import distributed
from d2v.train.distributed import DistInfo
from d2v.train.schedule import lr_at, tri_stage_lr

INITS = ("pretrained", "random")
CHECKPOINT_FORMAT = "d2v-finetune"
# finetune.<task> keys that only change evaluation: a resume may change them
EVAL_ONLY_KEYS = ("max_eval", "eval_split", "eval_batch_size", "probe_max_train", "probe_c")


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


def make_model(backbone: Data2Vec2, task: str, tc: TaskConfig, num_classes: int) -> Classifier:
    """The fine-tuning model of ``task``: the head ``tc.head`` names (``d2v.models.heads.HEADS``);
    ``tc.drop_path`` > 0 sets stochastic depth rising linearly over the blocks, 0 up to it (MAE's
    ``drop_path_rate``, fairseq ``MaeImageClassificationModel``'s linspace); ``tc.mask_prob`` /
    ``tc.mask_channel_prob`` > 0 turn on speech's fine-tuning-time masking (``FrameMasking``)."""
    clf = make_head(tc.head, backbone, task, num_classes, freeze_local=tc.freeze_local, pool_norm=tc.pool_norm)
    clf.set_masking(FrameMasking(tc.mask_prob, tc.mask_length, tc.mask_channel_prob, tc.mask_channel_length),
                    f"finetune.{task}")
    if tc.drop_path > 0:
        n = len(clf.blocks)
        for i, block in enumerate(clf.blocks):
            block.drop_path.p = tc.drop_path * i / max(1, n - 1)
    return clf


def task_setup(cfg: Config, task: str) -> tuple[Any, TaskConfig]:
    """Validate ``cfg``, apply ``finetune.threads``; the finetune section and the task's config."""
    cfg.validate()
    ft = cfg.finetune
    if ft.threads > 0:
        torch.set_num_threads(ft.threads)
    return ft, getattr(ft, task)


def use_bf16(precision: str, device: torch.device) -> bool:
    """``auto``: bf16 autocast on GPU, fp32 on the CPU."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def stream_seed(seed: int, segment: int) -> int:
    """Seed of the fine-tuning stream from step ``segment`` on (the same on every rank and for both inits)."""
    ss = np.random.SeedSequence([seed & 0xFFFFFFFF, segment, 0xF17E])
    return int(ss.generate_state(1)[0] & 0x7FFFFFFF)


@torch.no_grad()
def score_split(clf: Classifier, cfg: Config, task: str, split: str, max_n: int, info: DistInfo,
                progress: bool = False, desc: str = "score") -> dict[str, Any]:
    """The head's scores on one streamed pass over ``split`` (DDP: each rank its batches, counts summed)."""
    tc = getattr(cfg.finetune, task)
    inputs = task_inputs(cfg, task, pad_to_longest=True)
    batches = (b for _, b in eval_batches(cfg.data.root, inputs, split, tc.eval_batch_size, max_n,
                                          info.rank, info.world_size))
    bar = tqdm(desc=desc, disable=not progress, unit="sample", leave=False, dynamic_ncols=True)
    with torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=use_bf16(cfg.finetune.precision, info.device)):
        scores = clf.score(batches, info.device, reduce=distributed.all_reduce_sum, progress=bar)
    bar.close()
    return scores


# ------------------------------------------------------------------------------ checkpoints
def checkpoint_path(ft: Any, task: str, init: str) -> Path:
    return Path(ft.out_dir) / task / "checkpoints" / f"{init}.pt"


def run_identity(cfg: Config, task: str, source: str) -> dict[str, Any]:
    """What a resumed run must share with its checkpoint to continue it exactly."""
    tc = asdict(getattr(cfg.finetune, task))
    return {"seed": cfg.seed, "init": source, "model": to_dict(cfg)["model"], "ckpt_every": cfg.finetune.ckpt_every,
            "task": {k: v for k, v in tc.items() if k not in EVAL_ONLY_KEYS}}


def load_finetune_checkpoint(path: Path, identity: dict[str, Any], task: str, init: str) -> dict:
    """Read a fine-tuning checkpoint and refuse one of another configuration, naming the keys that differ."""
    from d2v.train.checkpoint import config_diff

    state = torch_load_checked(path)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path}: not a d2v fine-tuning checkpoint (no format {CHECKPOINT_FORMAT!r})")
    if (state.get("task"), state.get("init")) != (task, init):
        raise InputError(f"{path}: written for task {state.get('task')!r} ({state.get('init')}), not {task!r} ({init})")
    diffs = config_diff(state.get("identity", {}), identity, "")
    if diffs:
        diffs = [d.lstrip(".").replace("task.", f"finetune.{task}.", 1) for d in diffs]
        raise ConfigError(f"{path}: written for another fine-tuning configuration; {len(diffs)} differing key(s): "
                          f"{'; '.join(diffs[:12])}{' ...' if len(diffs) > 12 else ''} (resume with the same "
                          f"settings, or start afresh without --resume)")
    return state


# ------------------------------------------------------------------------------ training
@dataclass
class FinetuneRun:
    init: str
    val_accuracy: float
    train_loss: list[float] = field(default_factory=list)
    seconds: float = 0.0
    out_dir: str = ""
    mlflow_run_id: str = ""
    resumed_from: int = 0


def train_classifier(clf: Classifier, cfg: Config, task: str, info: DistInfo, *, progress: bool = True,
                     desc: str = "finetune", tracker: Any = None, state: dict | None = None,
                     save: Any = None, stop_after: int | None = None) -> list[float]:
    """``tc.steps`` AdamW steps on the streamed batches of ``task``; returns the loss per step.

    The batches depend on ``cfg.seed`` only (never on the init or the world size). ``state``: a
    checkpoint to continue from; ``save(step, opt, losses)`` is called at checkpoint steps.
    """
    tc, ft, device = getattr(cfg.finetune, task), cfg.finetune, info.device
    clf.to(device).train()
    groups = clf.layer_param_groups(tc.lr, tc.weight_decay, tc.layer_decay)
    opt = torch.optim.AdamW(groups, lr=tc.lr, betas=tuple(tc.betas))
    start, losses = 0, []
    if state is not None:
        clf.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, losses = int(state["step"]), [float(x) for x in state["losses"]]
    net: torch.nn.Module = clf
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        if device.type == "cuda":  # one set of BatchNorm statistics over the global batch (CUDA only)
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(clf)
        net = DDP(net, device_ids=[device.index] if device.type == "cuda" else None,
                  find_unused_parameters=cfg.model.layerdrop > 0 or tc.freeze_updates > 0)
    bf16 = use_bf16(ft.precision, device)
    inputs = task_inputs(cfg, task, train=True)
    bar = tqdm(range(start, tc.steps), desc=desc, disable=not progress, unit="step", dynamic_ncols=True,
               initial=start, total=tc.steps)
    every, t0, it, seg = max(1, tc.steps // 10), time.perf_counter(), None, -1
    for step in bar:
        if segment_start(step, ft.ckpt_every) != seg:  # a new stream at each checkpoint boundary
            seg = segment_start(step, ft.ckpt_every)
            end = min(seg + ft.ckpt_every, tc.steps) if ft.ckpt_every > 0 else tc.steps
            it = train_batches(cfg.data.root, inputs, tc.batch_size, end - seg, stream_seed(cfg.seed, seg),
                               info.rank, info.world_size, cfg.data.num_workers)
            for _ in range(step - seg):
                next(it)
        batch = next(it)
        clf.check_data(batch)
        clf.encoder.check_input(batch.source)  # on the CPU: a range check on the GPU would stall the host
        lr = (tri_stage_lr(step, tc.lr, tc.steps, tuple(tc.phase_ratio), tc.min_lr) if tc.schedule == "tri_stage"
              else lr_at(step, tc.lr, tc.warmup_steps, tc.steps, tc.min_lr))
        clf.freeze_encoder = step < tc.freeze_updates
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        # per-sample masks of (seed, step, key): the same for both inits, any world size, a resume
        seeds = frame_mask_seeds(cfg.seed, step, batch.keys) if clf.masking.active else None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = net(batch.source.to(device), batch.lengths, mask_seeds=seeds)
        loss = clf.loss(out.float(), clf.targets(batch), label_smoothing=tc.label_smoothing)
        logged = float(distributed.all_reduce_mean(loss.detach().clone()))  # the global batch's mean loss
        if not np.isfinite(logged):
            raise FloatingPointError(f"{desc}: step {step + 1}: loss is {logged} (not finite)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tc.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(clf.parameters(), tc.clip_norm)
        opt.step()
        losses.append(logged)
        if tracker is not None:
            tracker.log({"train_loss": logged, "lr": lr}, step + 1)
        sps = (step + 1 - start) * tc.batch_size / max(1e-9, time.perf_counter() - t0)
        if progress:
            bar.set_postfix({"loss": f"{logged:.3f}", "lr": f"{lr:.1e}", "samples/s": f"{sps:.0f}"})
        elif info.is_main and ((step + 1) % every == 0 or step + 1 == tc.steps):  # a log: ten lines a run
            print(f"{desc}: step {step + 1}/{tc.steps} loss {logged:.4f} lr {lr:.2e} samples/s {sps:.0f}", flush=True)
        if save is not None and ft.ckpt_every > 0 and ((step + 1) % ft.ckpt_every == 0 or step + 1 == tc.steps):
            save(step + 1, opt, losses)
        if stop_after is not None and step + 1 >= stop_after:
            break
    clf.freeze_encoder = False
    return losses


def finetune_task(cfg: Config, task: str, progress: bool = True, inits: tuple[str, ...] = INITS,
                  metrics_path: Path | None = None, history_path: Path | None = None,
                  resume: bool = False, stop_after: int | None = None) -> dict[str, FinetuneRun]:
    """Fine-tune the pretrained and the random-init classifier of ``task`` with the same budget,
    in one process or under torchrun. ``resume``: continue each init from its checkpoint, if any.
    ``stop_after``: end each run after that step (an interruption, for tests)."""
    ft, _ = task_setup(cfg, task)
    with distributed.process_group(ft.device) as info:
        names = label_names(cfg.data.root, task)
        runs = {init: _finetune_one(cfg, task, init, names, info, progress and info.is_main, resume, stop_after)
                for init in inits}
        if info.is_main:
            tc = getattr(ft, task)
            _write_reports(task, runs, tc.steps * tc.batch_size, split_size(cfg.data.root, task, "train"),
                           metrics_path, history_path)
        distributed.barrier()
    return runs


def _finetune_one(cfg: Config, task: str, init: str, names: list[str], info: DistInfo, progress: bool,
                  resume: bool, stop_after: int | None) -> FinetuneRun:
    ft, tc = cfg.finetune, getattr(cfg.finetune, task)
    source = "random" if init == "random" else ft.init
    backbone = load_backbone(source, cfg.model, cfg.seed, map_location="cpu")
    if init == "pretrained" and backbone.cfg != cfg.model:
        # The checkpoint's architecture is what we fine-tune; the random baseline must match it.
        cfg.model = backbone.cfg
    torch.manual_seed(cfg.seed + 1)  # the same head init for both
    clf = make_model(backbone, task, tc, len(names))
    identity = run_identity(cfg, task, source)
    ckpt = checkpoint_path(ft, task, init)
    state = None
    if resume and ckpt.is_file():
        state = load_finetune_checkpoint(ckpt, identity, task, init)
        if info.is_main:
            print(f"{task} ({init}): resumed from {ckpt} at step {state['step']}", flush=True)
    elif resume and info.is_main:
        print(f"{task} ({init}): --resume: no checkpoint at {ckpt}, starting from step 0", flush=True)
    from d2v.train.checkpoint import restore_rng, rng_state

    restore_rng(state, cfg, info)  # dropout and layerdrop: per rank, as pretraining
    tracker = None
    if ft.track and info.is_main:
        from d2v.tracking.mlflow_utils import Tracker

        tracker = Tracker(f"finetune-{task}-{init}", {"task": task, "init": source, **to_dict(cfg)},
                          tags={"stage": "finetune", "task": task, "init": init,
                                "resumed_from": str(state["step"] if state else 0)})
        tracker.log_shards(cfg.data.root, [task], "train")

    def save(step: int, opt: torch.optim.Optimizer, losses: list[float]) -> None:
        rngs = distributed.all_gather_object(rng_state(info.device))
        if info.is_main:
            atomic_save({"format": CHECKPOINT_FORMAT, "version": 1, "task": task, "init": init, "step": step,
                         "model": clf.state_dict(), "optimizer": opt.state_dict(), "losses": list(losses),
                         "identity": identity, "world_size": info.world_size,
                         "rng": [{"cpu": r["cpu"].cpu(), "cuda": r["cuda"].cpu()} for r in rngs]}, ckpt)

    start = time.perf_counter()
    try:
        losses = train_classifier(clf, cfg, task, info, progress=progress, desc=f"finetune {task} ({init})",
                                  tracker=tracker, state=state, save=save, stop_after=stop_after)
        val = score_split(clf, cfg, task, "val", tc.max_eval, info, progress, f"{task} ({init}): val")
    except BaseException:
        if tracker is not None:
            tracker.finish("FAILED")
        raise
    run = FinetuneRun(init, float(val["accuracy"]), losses, time.perf_counter() - start,
                      resumed_from=int(state["step"]) if state else 0)
    out = Path(ft.out_dir) / task / init
    run.out_dir = str(out)
    if info.is_main:
        save_classifier(clf.cpu(), out, {"task": task, "labels": names, "init": source, "seed": cfg.seed,
                                         "val_accuracy": run.val_accuracy, "task_config": asdict(tc)})
        clf.to(info.device)
        if tracker is not None:
            tracker.log({"val_accuracy": run.val_accuracy}, tc.steps)
            for p in (out / "config.json", out / "weights.pt"):
                tracker.artifact(p, "classifier")
            run.mlflow_run_id = tracker.run_id
            tracker.finish()
        print(f"{task} ({init}): val accuracy {run.val_accuracy:.4f}, final train loss {losses[-1]:.4f}, "
              f"{run.seconds:.1f} s", flush=True)
    return run


def _write_reports(task: str, runs: dict[str, FinetuneRun], n_seen: int, n_split: int | None,
                   metrics_path: Path | None, history_path: Path | None) -> None:
    if metrics_path is not None:
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        report: dict[str, Any] = {"task": task, "train_samples_seen": n_seen, "train_split_samples": n_split}
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
        steps = min(len(runs[i].train_loss) for i in inits)
        with open(history_path, "w", newline="") as f:
            w = csv.writer(f, delimiter="\t")
            w.writerow(["step"] + [f"loss_{i}" for i in inits])
            for s in range(steps):
                w.writerow([s + 1] + [f"{runs[i].train_loss[s]:.5f}" for i in inits])
