"""Self-supervised pretraining loop, single process or DistributedDataParallel under torchrun.

One optimizer step per modality batch, modalities in turn (round robin over
``train.modalities``); AdamW with the spec's betas/eps and weight-decay groups; linear warm-up
then cosine decay; optional clipping and gradient accumulation; bf16 autocast on GPU; the EMA
teacher moved after every optimizer step; the collapse and NaN guards checked every step.

Several processes (``torchrun --nproc_per_node N -m d2v.cli.main pretrain ...``; see
:mod:`d2v.train.distributed`):

* ``train.batch_size`` is the GLOBAL batch of one forward pass; each of the W ranks gets
  ``batch_size / W`` samples (a ConfigError if W does not divide it) and DDP averages the
  gradients. Each rank backpropagates ``W x`` its share of the global-batch loss (the masked-token
  sum over the global masked-token count, plus the image CLS term summed over this rank's
  instances), so the update is the one a single process would make on the whole batch, even when
  ranks hold different numbers of masked tokens (speech crops differ per rank).
* Round robin means a step uses one modality encoder and the shared blocks, not the other
  modalities' encoders: DDP runs with ``find_unused_parameters=True``. The alternatives do not
  fit: ``static_graph`` needs the same graph every step; one DDP wrapper per modality would
  all-reduce the shared blocks' gradients in several buckets orders; and a dummy ``0 * p.sum()``
  over unused parameters would hand AdamW zero gradients where a single process has ``None``
  (weight decay and momentum would move those parameters). Parameters unused on every rank keep
  ``grad=None`` as in a single process. The graph walk costs little next to the forward pass.
* The teacher is a submodule whose parameters do not require gradients: DDP does not reduce them
  (it broadcasts them from rank 0 once, at wrap time). It is moved by
  ``model.update_teacher`` on the unwrapped module from the student weights after
  ``optimizer.step()``, which are identical on every rank, so it stays identical too; buffers are
  not re-broadcast each forward (there are no running statistics, only the EMA counter and fixed
  tables) and every checkpoint checks that all ranks hold the same weights.
* Rank 0 alone shows the progress bar, prints, logs to MLflow, writes reports and checkpoints;
  logged losses and variances are means over ranks, samples/s counts the global batch. The
  collapse / NaN guards look at those means, so every rank stops at the same step.
* Gradient accumulation: ``no_sync()`` on all but the last micro-batch.

Data: with ``data.source=sample`` batches and masks are a pure function of ``(seed, step)``; every
rank draws the same global batch (and the global ``(B*M, T)`` masks, sample-major) and takes
rows ``[r*b, (r+1)*b)`` (masks ``[r*b*M, (r+1)*b*M)``), so W processes see exactly what one
process sees. With ``data.source=shards`` each rank reads its own resampled stream per
modality; a stream is re-created at every checkpoint boundary (every ``train.ckpt_every``
steps; once at step 0 when it is 0), seeded by (seed, rank, segment start, modality).

Checkpoints hold the model (student + teacher), optimizer, step, config, every rank's RNG state
(dropout, decoder mask noise) and the data position (step, batches consumed per modality, stream
seeds), so ``--resume`` continues exactly: a resumed run re-creates the current segment's stream
and skips the batches already consumed (none when it stopped at a checkpoint boundary). Runtime
randomness is seeded per rank (``seed + rank``) after the model is initialised from ``seed``.
"""

from __future__ import annotations

import contextlib
import csv
import inspect
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional, Union

import numpy as np
import torch
from tqdm import tqdm

from d2v.config import Config, to_dict
from d2v.data.sample import SampleData, step_generator
from d2v.errors import ConfigError, InputError
from d2v.models import CollapseError, Data2Vec2
from d2v.train import distributed
from d2v.train.distributed import DistInfo

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "d2v-pretrain"
CHECKPOINT_VERSION = 2
_CHECKPOINT_KEYS = ("model", "optimizer", "step", "config")
_MODALITY_SALT = {"image": 1, "speech": 2, "text": 3}
# Warn when the speech local features (CNN + projection, what the teacher is fed) vary across
# frames by less than this fraction of their overall std: 0.74 for the random tiny model on the
# embedded words; 0.04 with a collapsed CNN; 0.53 / 0.28 / 0.14 after 200 / 1,000 / 4,000
# speech steps with the CNN fixed (the projection after it shrinks slowly).
LOCAL_COLLAPSE_RATIO = 0.25
# train.* settings that change which batches a step sees; others (max_steps, lr, ...) may change on resume
_DATA_KEYS = ("batch_size", "modalities", "grad_accum", "ckpt_every")


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
    world_size: int = 1


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
    """Write to a temp file in the same folder, fsync, then rename: a crash never leaves half a file.

    A failed write (disk full, quota, I/O error) removes the temp file and raises ``OSError``
    naming the checkpoint and the cause; the previous checkpoint at ``path`` is left as it was.
    """
    from d2v.models.export import save_torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        save_torch(obj, tmp)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        why = os.strerror(e.errno) if e.errno else str(e)
        kept = f"the previous checkpoint {path} is unchanged" if path.exists() else "no checkpoint was written"
        msg = f"{path}: could not write the checkpoint ({why}); {kept}"
        raise (OSError(e.errno, msg) if e.errno else OSError(msg)) from e
    os.replace(tmp, path)


# ------------------------------------------------------------------------------ data positions
def segment_start(step: int, ckpt_every: int) -> int:
    """First step of the stream segment that ``step`` belongs to (segments end at checkpoints)."""
    return (step // ckpt_every) * ckpt_every if ckpt_every > 0 else 0


def batches_in(start: int, end: int, modality: str, modalities: list[str], grad_accum: int = 1) -> int:
    """Micro-batches of ``modality`` that steps ``[start, end)`` consume (round robin)."""
    n, i = len(modalities), modalities.index(modality)
    if end <= start:
        return 0

    def upto(s: int) -> int:  # steps in [0, s) with step % n == i
        return max(0, (s - i + n - 1) // n)

    return (upto(end) - upto(start)) * grad_accum


def stream_seed(seed: int, rank: int, segment: int, modality: str) -> int:
    """Seed of a rank's shard stream for one modality and segment (well mixed, 31 bits)."""
    ss = np.random.SeedSequence([seed & 0xFFFFFFFF, rank, segment, _MODALITY_SALT[modality]])
    return int(ss.generate_state(1)[0] & 0x7FFFFFFF)


def data_position(cfg: Config, step: int, world_size: int) -> dict[str, Any]:
    """Where the data streams stand after ``step`` steps (saved in checkpoints, checked on resume)."""
    t = cfg.train
    pos: dict[str, Any] = {
        "source": cfg.data.source, "step": step, "world_size": world_size,
        # per rank, micro-batches of each modality since step 0 (sample source: global batches)
        "batches_consumed": {m: batches_in(0, step, m, t.modalities, t.grad_accum) for m in t.modalities},
    }
    if cfg.data.source == "shards":
        seg = segment_start(step, t.ckpt_every)
        pos.update({
            "segment_start": seg, "segment_steps": t.ckpt_every,
            "segment_batches_consumed": {m: batches_in(seg, step, m, t.modalities, t.grad_accum) for m in t.modalities},
            "stream_seeds": {m: [stream_seed(cfg.seed, r, seg, m) for r in range(world_size)] for m in t.modalities},
        })
    return pos


class ShardStreams:
    """This rank's shard stream per modality, re-created at every segment start.

    A stream made for segment ``[s, e)`` yields exactly the micro-batches its modality needs
    there; made mid-segment (a resume), it first skips what the steps ``[s, step)`` consumed.
    """

    def __init__(self, cfg: Config, rank: int, batch_size: int):
        self.cfg, self.rank, self.batch_size = cfg, rank, batch_size
        self.segment: Optional[int] = None
        self.iters: dict[str, Any] = {}

    def next(self, modality: str, step: int):
        from d2v.data.loaders import make_train_loader

        t = self.cfg.train
        seg = segment_start(step, t.ckpt_every)
        if seg != self.segment:
            self.segment, self.iters = seg, {}  # the old loaders (and their workers) are dropped
        it = self.iters.get(modality)
        if it is None:
            end = min(seg + t.ckpt_every, t.max_steps) if t.ckpt_every > 0 else t.max_steps
            n = batches_in(seg, max(end, step + 1), modality, t.modalities, t.grad_accum)
            seed = stream_seed(self.cfg.seed, self.rank, seg, modality)
            it = iter(make_train_loader(self.cfg, modality, self.batch_size, n, seed, rank=self.rank))
            for _ in range(batches_in(seg, step, modality, t.modalities, t.grad_accum)):
                next(it)  # fast-forward to where the interrupted run stopped
            self.iters[modality] = it
        try:
            return next(it)
        except StopIteration:
            raise RuntimeError(f"{modality} stream of segment {seg} ran out at step {step}") from None


# ------------------------------------------------------------------------------ checkpoints
def _diff(saved: Any, current: Any, prefix: str) -> list[str]:
    """Dotted keys whose values differ, with both values."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out: list[str] = []
        for k in sorted(set(saved) | set(current), key=str):
            key = f"{prefix}.{k}"
            if k not in saved:
                out.append(f"{key} (not in the checkpoint; now {current[k]!r})")
            elif k not in current:
                out.append(f"{key} (checkpoint {saved[k]!r}; not in this version)")
            else:
                out.extend(_diff(saved[k], current[k], key))
        return out
    if saved != current:
        return [f"{prefix} (checkpoint {saved!r}, now {current!r})"]
    return []


def load_checkpoint(path: Union[str, Path], cfg: Config, map_location: Union[str, torch.device] = "cpu") -> dict:
    """Read and check a pretraining checkpoint for ``cfg``: ``torch.load(weights_only=True)``.

    Raises ``InputError`` naming the file when it is missing, unreadable (truncated, corrupt) or not
    a d2v pretraining checkpoint, and ``ConfigError`` listing the differing ``model.*`` keys when
    it was written for another model configuration.
    """
    import pickle
    import zipfile

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: checkpoint not found")
    if not path.is_file():
        raise InputError(f"{path}: is not a file (expected a checkpoint written by `d2v pretrain`)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        msg = (str(e).strip().splitlines() or [""])[0][:200]
        if "weights only" in str(e).lower() or "unsupported global" in str(e).lower():
            raise InputError(f"{path}: not a d2v checkpoint: it holds objects other than tensors and plain "
                             f"containers, which weights-only loading refuses ({msg})") from e
        raise InputError(f"{path}: corrupt or truncated checkpoint ({msg})") from e
    except (zipfile.BadZipFile, EOFError, RuntimeError, ValueError, OSError, KeyError, AttributeError,
            TypeError, IndexError, UnicodeDecodeError) as e:
        msg = (str(e).strip().splitlines() or [""])[0][:200]
        raise InputError(f"{path}: corrupt or truncated checkpoint ({type(e).__name__}: {msg})") from e
    if not isinstance(state, dict) or any(k not in state for k in _CHECKPOINT_KEYS):
        found = sorted(map(str, state))[:10] if isinstance(state, dict) else type(state).__name__
        raise InputError(f"{path}: not a d2v pretraining checkpoint (expected the keys "
                         f"{', '.join(_CHECKPOINT_KEYS)}; found {found})")
    if state.get("format", CHECKPOINT_FORMAT) != CHECKPOINT_FORMAT:
        raise InputError(f"{path}: not a d2v pretraining checkpoint (format {state.get('format')!r}, "
                         f"expected {CHECKPOINT_FORMAT!r})")
    saved_cfg = state["config"]
    if not isinstance(saved_cfg, dict) or not isinstance(saved_cfg.get("model"), dict):
        raise InputError(f"{path}: not a d2v pretraining checkpoint (no 'config.model' section)")
    if not isinstance(state["model"], dict) or not isinstance(state["step"], int):
        raise InputError(f"{path}: not a d2v pretraining checkpoint ('model' must be a state dict, 'step' an int)")
    diffs = _diff(saved_cfg["model"], to_dict(cfg)["model"], "model")
    if diffs:
        raise ConfigError(f"{path}: written for a different model configuration; {len(diffs)} differing "
                          f"key(s): {'; '.join(diffs[:12])}{' ...' if len(diffs) > 12 else ''}")
    return state


def _resume_path(resume: Union[bool, str, Path, None], default: Path, main: bool) -> Optional[Path]:
    """``True``: the run's own checkpoint if there is one (else start at step 0, and say so);
    a path: that file, which must exist."""
    if resume is None or resume is False:
        return None
    if resume is True:
        if default.exists():
            return default
        if main:
            print(f"--resume: no checkpoint at {default}, starting from step 0", flush=True)
        return None
    path = Path(resume)
    if not path.exists():
        raise InputError(f"{path}: checkpoint not found (--resume-from needs an existing file; "
                         "--resume alone starts from step 0 when there is none)")
    return path


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.empty(0, dtype=torch.uint8)
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def _restore_rng(state: Optional[dict], cfg: Config, info: DistInfo) -> None:
    """Per-rank runtime randomness (dropout, mask noise, layerdrop): from the checkpoint, or
    seeded ``seed + rank`` (the model itself was initialised from ``seed`` on every rank)."""
    if state is not None:
        ranks = state.get("rng")
        mine = None
        if isinstance(ranks, list) and len(ranks) == info.world_size:
            mine = ranks[info.rank]
        elif "rng_cpu" in state and info.world_size == 1:  # version 1 checkpoints
            cuda = state.get("rng_cuda") or []
            mine = {"cpu": state["rng_cpu"], "cuda": cuda[info.device.index or 0] if cuda else torch.empty(0)}
        if mine is not None:
            torch.set_rng_state(mine["cpu"].cpu())
            if info.device.type == "cuda" and mine["cuda"].numel():
                torch.cuda.set_rng_state(mine["cuda"].cpu(), info.device)
            return
        if info.is_main:
            print(f"note: the checkpoint holds no RNG state for {info.world_size} process(es): dropout and "
                  "mask noise are re-seeded (data batches are not affected)", flush=True)
        step = int(state["step"])
        torch.manual_seed(cfg.seed + info.rank + 7919 * step)
        return
    torch.manual_seed(cfg.seed + info.rank)


# ------------------------------------------------------------------------------ the run
@dataclass
class _Run:
    cfg: Config
    info: DistInfo
    model: Data2Vec2  # the unwrapped module: update_teacher, check_collapse, encoder, state_dict
    net: torch.nn.Module  # what the forward goes through: DDP(model) or model
    opt: torch.optim.Optimizer
    data: Optional[SampleData]
    streams: Optional[ShardStreams]
    batch: int  # per rank
    use_bf16: bool
    ckpt_path: Path
    out_dir: Path
    result: PretrainResult
    progress: bool
    stop_after: Optional[int]
    tracker: Any = None


def pretrain(cfg: Config, resume: Union[bool, str, Path] = False, progress: bool = True,
             metrics_path: Optional[Path] = None, history_path: Optional[Path] = None,
             stop_after: Optional[int] = None) -> PretrainResult:
    """Pretrain ``cfg``, in one process or under torchrun (DDP, see the module docstring).

    ``resume``: ``True`` continues from ``<train.out_dir>/checkpoint.pt`` if it exists (from step 0,
    with a note, if not); a path continues from that checkpoint (an ``InputError`` if missing).
    ``stop_after`` ends the run early after that step's checkpoint (an interruption, for tests).
    """
    cfg.validate()
    with distributed.process_group(cfg.train.device) as info:
        return _pretrain(cfg, info, resume, progress, metrics_path, history_path, stop_after)


def _pretrain(cfg: Config, info: DistInfo, resume, progress, metrics_path, history_path, stop_after) -> PretrainResult:
    t = cfg.train
    batch = t.per_rank_batch(info.world_size)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    if t.threads > 0:
        torch.set_num_threads(t.threads)
    device = info.device
    use_bf16 = t.precision == "bf16" or (t.precision == "auto" and device.type == "cuda")

    model = Data2Vec2(cfg.model).to(device)
    opt = torch.optim.AdamW(
        model.param_groups(t.weight_decay), lr=t.lr, betas=tuple(t.betas), eps=t.eps,
        fused=device.type == "cuda",
    )
    out_dir = Path(t.out_dir)
    ckpt_path = out_dir / CHECKPOINT
    start, state = 0, None
    path = _resume_path(resume, ckpt_path, info.is_main)
    if path is not None:
        state = load_checkpoint(path, cfg, map_location=device)
        try:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            msg = (str(e).strip().splitlines() or [""])[0][:300]
            raise InputError(f"{path}: cannot restore the model/optimizer: {msg}") from e
        start = int(state["step"])
        if info.is_main:
            print(f"resumed from {path} at step {start}", flush=True)
            _note_resume_differences(state, cfg, start, info.world_size)
    _restore_rng(state, cfg, info)

    net: torch.nn.Module = model
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # No per-forward buffer broadcast (the buffers are identical: the EMA counter, fixed
        # positions); newer torch spells it forward_sync_buffers. Both still sync at wrap time.
        no_buf = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                  else {"broadcast_buffers": False})
        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                  find_unused_parameters=True, **no_buf)

    if cfg.data.source == "sample":
        data = SampleData(cfg.model, t.modalities, cfg.data.num_samples, cfg.seed,
                          cfg.data.audio_seconds, cfg.data.text_length)
        streams = None
    else:
        data, streams = None, ShardStreams(cfg, info.rank, batch)

    result = PretrainResult(steps=t.max_steps, world_size=info.world_size)
    tracker = None
    if t.track and info.is_main:
        from d2v.tracking.mlflow_utils import Tracker

        tracker = Tracker("pretrain", to_dict(cfg), tags={"stage": "pretrain", "resumed_from": str(start),
                                                          "world_size": str(info.world_size)})
        result.mlflow_run_id = tracker.run_id
    run = _Run(cfg, info, model, net, opt, data, streams, batch, use_bf16, ckpt_path, out_dir, result,
               progress and info.is_main, stop_after, tracker)
    try:
        _loop_and_save(run, start)
    except BaseException:
        if tracker is not None:
            tracker.finish("FAILED")
        raise
    if tracker is not None:
        for p in (ckpt_path, out_dir / "config.json"):
            if p.exists():
                tracker.artifact(p, "pretrain")
    if stop_after is None and info.is_main:
        _write_reports(cfg, result, metrics_path, history_path, tracker)
    if tracker is not None:
        for p in (metrics_path, history_path):
            if p is not None and p.exists():
                tracker.artifact(p, "reports")
        tracker.finish()
    distributed.barrier()  # every rank returns after rank 0's files exist
    return result


def _note_resume_differences(state: dict, cfg: Config, start: int, world_size: int) -> None:
    saved_train = state["config"].get("train", {}) if isinstance(state["config"].get("train"), dict) else {}
    now = to_dict(cfg)
    diffs = [d for k in _DATA_KEYS if k in saved_train for d in _diff(saved_train[k], now["train"][k], f"train.{k}")]
    if state["config"].get("seed") != cfg.seed:
        diffs.append(f"seed (checkpoint {state['config'].get('seed')!r}, now {cfg.seed!r})")
    saved_pos = state.get("data")
    if isinstance(saved_pos, dict):
        diffs += _diff(saved_pos, data_position(cfg, start, world_size), "data position")
    if diffs:
        print("note: not an exact continuation of the checkpoint's run (the batches differ): " + "; ".join(diffs[:8]),
              flush=True)


def _state(run: _Run, step: int) -> Optional[dict]:
    """The checkpoint dict on rank 0 (None elsewhere); a collective: every rank must call it."""
    rngs = distributed.all_gather_object(_rng_state(run.info.device))
    if run.info.distributed:
        _check_replicas(run.model)
    if not run.info.is_main:
        return None
    return {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
        "model": run.model.state_dict(), "optimizer": run.opt.state_dict(), "step": step,
        "config": to_dict(run.cfg), "world_size": run.info.world_size,
        "rng": [{"cpu": r["cpu"].cpu(), "cuda": r["cuda"].cpu()} for r in rngs],
        "data": data_position(run.cfg, step, run.info.world_size),
    }


def _save(run: _Run, step: int) -> None:
    state = _state(run, step)
    if state is not None:
        atomic_save(state, run.ckpt_path)


@torch.no_grad()
def _check_replicas(model: Data2Vec2) -> None:
    """Every rank must hold the same student, teacher and buffers: compare per-tensor sums."""
    sd = model.state_dict()
    names = list(sd)
    fp = torch.stack([v.detach().double().sum() for v in sd.values()])
    hi, lo = fp.clone(), fp.clone()
    torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX)
    torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN)
    bad = (hi != lo).nonzero().flatten().tolist()
    if bad:
        raise RuntimeError(f"DDP replicas diverged: {len(bad)} tensor(s) differ between ranks, e.g. "
                           f"{', '.join(names[i] for i in bad[:5])}")


def _micro_batch(run: _Run, modality: str, step: int, micro: int):
    """This rank's (source, mask) for one micro-batch."""
    cfg, t = run.cfg, run.cfg.train
    if run.data is not None:
        # The global batch and its global masks, then this rank's rows (sample-major masks).
        idx = step * t.grad_accum + micro
        src = run.data.batch(modality, idx, t.batch_size)
        enc = run.model.encoder(modality)
        length = enc.num_tokens(tuple(src.shape))
        gen = step_generator(cfg.seed, idx, salt=17)
        M = cfg.model.clone_batch
        mask = enc.make_mask(t.batch_size * M, length, torch.device("cpu"), gen)
        if run.info.distributed:
            r, b = run.info.rank, run.batch
            src, mask = src[r * b:(r + 1) * b], mask[r * b * M:(r + 1) * b * M]
        return src, mask
    batch = run.streams.next(modality, step)
    return batch.source, batch.mask


def _rank_loss(out, world_size: int) -> torch.Tensor:
    """This rank's share of the global-batch loss, scaled by W because DDP averages gradients.

    The regression terms are summed over masked tokens and divided by the masked-token count of
    the whole global batch; the image CLS term is a sum over instances (``* sample_size`` in the
    model undoes the division), so it is taken as this rank's sum. In a world of one: ``out.loss``.
    """
    if world_size == 1:
        return out.loss
    local = out.sample_size.detach().float()
    total = distributed.all_reduce_sum(local.clone()).clamp_min(1)
    terms = out.loss_terms or {"regression": out.loss_sum}
    cls = terms.get("cls")
    tokens = sum(v for k, v in terms.items() if k != "cls")
    loss = tokens * (world_size / total)
    if cls is not None:
        loss = loss + cls * (world_size / local.clamp_min(1))
    return loss


def _loop_and_save(run: _Run, start: int) -> None:
    cfg, info, model, net, opt, result = run.cfg, run.info, run.model, run.net, run.opt, run.result
    t = cfg.train
    device = info.device
    times: dict[str, list[float]] = {m: [] for m in t.modalities}
    history: list[dict] = []
    n_samples, t_start = 0, time.perf_counter()
    last_good = start if start > 0 and run.ckpt_path.exists() else None  # step of the checkpoint on disk

    model.train()
    # The speech encoder's local features per micro-batch (CNN, then LayerNorm + Linear projection:
    # what the student's context encoder and the teacher are fed): mean, std, and the std of each
    # channel across frames (averaged over channels). A collapsing front-end can hide behind a
    # healthy loss (fairseq #5239): every frame tends to one vector, so the frame std falls far
    # below the overall std. With the CNN fixed (local_grad_mult 0) the projection still trains
    # and shrinks slowly. Read by a hook, so the model's numerics are untouched.
    local_stats: list[torch.Tensor] = []
    hook = None
    warned_local = False
    if "speech" in t.modalities:
        def _record_local(_mod, _inp, output):
            o = output.detach().float()  # (B, T, D)
            frame_std = o.reshape(-1, o.shape[-1]).std(0).mean()
            local_stats.append(torch.stack([o.mean(), o.std(), frame_std]))

        hook = model.encoder("speech").project_features.register_forward_hook(_record_local)
    bar = tqdm(range(start, t.max_steps), initial=start, total=t.max_steps, disable=not run.progress,
               desc="pretrain", unit="step", dynamic_ncols=True)
    for step in bar:
        modality = t.modalities[step % len(t.modalities)]
        local_stats.clear()
        lr = lr_at(step, t.lr, t.warmup_steps, t.max_steps, t.min_lr)
        for group in opt.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        losses = []
        for micro in range(t.grad_accum):
            src, mask = _micro_batch(run, modality, step, micro)
            # Mask and padding stay on the CPU: the model checks them there (no device sync).
            pad = src.eq(cfg.model.text.pad_idx) if modality == "text" else None
            src = src.to(device, non_blocking=True)
            last = micro == t.grad_accum - 1
            sync = contextlib.nullcontext() if last or not info.distributed else net.no_sync()
            with sync:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=run.use_bf16):
                    out = net(src, modality, mask=mask, padding_mask=pad)
                loss_r = _rank_loss(out, info.world_size)
                (loss_r / t.grad_accum).backward()
            losses.append(loss_r.detach())
        if t.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_norm)
        opt.step()
        decay = model.update_teacher(step + 1)
        # One collective for what is logged and guarded: means over ranks.
        parts = [torch.stack(losses).mean().float(), out.target_var.float(), out.pred_var.float()]
        if modality == "speech" and local_stats:
            parts += list(torch.stack(local_stats).to(parts[0].device).mean(0))
        stats = torch.stack(parts)
        distributed.all_reduce_mean(stats)
        try:
            model.check_collapse(SimpleNamespace(loss=stats[0], target_var=stats[1], pred_var=stats[2]), step + 1)
        except CollapseError as e:
            kept = (f"the last good checkpoint is {run.ckpt_path} (step {last_good})" if last_good is not None
                    else "no checkpoint was written before it")
            raise CollapseError(f"pretraining stopped ({modality} batch): {e}; {kept}") from e
        loss, tvar, pvar, *local = (float(v) for v in stats.tolist())
        dt = time.perf_counter() - t0
        times[modality].append(dt)
        n_samples += t.batch_size * t.grad_accum  # global
        result.first_loss.setdefault(modality, loss)
        result.last_loss[modality] = loss
        row = {"step": step + 1, "modality": modality, "loss": loss, "lr": lr, "ema_decay": decay,
               "target_var": tvar, "pred_var": pvar, "step_time_s": dt}
        if "speech" in t.modalities:  # the same columns on every row (the history is a TSV)
            row["local_mean"], row["local_std"], row["local_frame_std"] = local if local else (float("nan"),) * 3
            if local and not warned_local and local[2] < LOCAL_COLLAPSE_RATIO * local[1] and info.is_main:
                warned_local = True
                print(f"warning: step {step + 1}: the speech local features (CNN + projection) barely vary "
                      f"across frames (frame std {local[2]:.3g} vs overall std {local[1]:.3g}): the local "
                      f"encoder may have collapsed (fairseq #5239); model.speech.local_grad_mult=0 keeps "
                      f"the CNN at its initialisation",
                      file=sys.stderr, flush=True)
        history.append(row)
        if info.is_main:
            sps = n_samples / (time.perf_counter() - t_start)
            if run.tracker is not None:
                logged = {f"{modality}/loss": loss, f"{modality}/target_var": tvar,
                          f"{modality}/pred_var": pvar, "lr": lr, "ema_decay": decay, "samples_per_s": sps}
                if local:
                    logged.update({"speech/local_mean": local[0], "speech/local_std": local[1],
                                   "speech/local_frame_std": local[2]})
                run.tracker.log(logged, step + 1)
            if run.progress:
                bar.set_postfix(mod=modality[:2], loss=f"{loss:.3f}", lr=f"{lr:.1e}", sps=f"{sps:.1f}")
            elif t.log_every and (step + 1) % t.log_every == 0:
                print(f"step {step + 1}/{t.max_steps} {modality} loss {loss:.4f} lr {lr:.2e} "
                      f"tvar {tvar:.3f} pvar {pvar:.3f} samples/s {sps:.1f}", flush=True)
        if t.ckpt_every and (step + 1) % t.ckpt_every == 0 and step + 1 < t.max_steps:
            _save(run, step + 1)
            last_good = step + 1
        if run.stop_after is not None and step + 1 >= run.stop_after:
            _save(run, step + 1)
            bar.close()
            result.checkpoint = str(run.ckpt_path)
            result.history = history
            if hook is not None:
                hook.remove()
            return
    bar.close()
    if hook is not None:
        hook.remove()

    result.samples_per_s = n_samples / max(1e-9, time.perf_counter() - t_start)
    for m, ts in times.items():
        if ts:  # median step time, skipping the first (warm-up) step
            s = sorted(ts[1:] or ts)
            result.step_time_s[m] = s[len(s) // 2]
    _save(run, max(start, t.max_steps))
    result.checkpoint = str(run.ckpt_path)
    if info.is_main:
        (run.out_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
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
            "world_size": result.world_size,
            "mlflow_run_id": result.mlflow_run_id,
        }, indent=2))
    if history_path is not None and history:
        history_path.parent.mkdir(parents=True, exist_ok=True)
        with open(history_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(history[0]), delimiter="\t")
            w.writeheader()
            w.writerows(history)
