"""Pretraining checkpoints: what one holds, how it is written, read, checked and resumed.

A checkpoint (``<train.out_dir>/checkpoint.pt``) is a plain dict of tensors and containers, read
with ``torch.load(weights_only=True)``:

* ``model`` (student + EMA teacher state dict), ``optimizer``, ``step``, ``config`` (the whole
  composed config as a dict), ``world_size``;
* ``rng``: every rank's CPU/CUDA RNG state (dropout, decoder mask noise), gathered to rank 0;
* ``data``: where the data streams stand (:func:`d2v.data.streams.data_position`), so a resumed
  run reads the same batches as an uninterrupted one.

Writes are atomic (:func:`d2v.io.atomic_save`). Version 1 checkpoints (single process,
``rng_cpu``/``rng_cuda``) still load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from d2v.config import Config, to_dict
from d2v.data.streams import data_position
from d2v.errors import ConfigError, InputError
from d2v.train import distributed
from d2v.train.distributed import DistInfo

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "d2v-pretrain"
CHECKPOINT_VERSION = 2
_CHECKPOINT_KEYS = ("model", "optimizer", "step", "config")
# train.* settings that change which batches a step sees; others (max_steps, lr, ...) may change on resume
_DATA_KEYS = ("batch_size", "modalities", "grad_accum", "ckpt_every")


def checkpoint_state(model: torch.nn.Module, opt: torch.optim.Optimizer, cfg: Config, step: int,
                     info: DistInfo) -> dict | None:
    """The checkpoint dict on rank 0 (None elsewhere); a collective: every rank must call it."""
    rngs = distributed.all_gather_object(rng_state(info.device))
    if info.distributed:
        distributed.check_replicas(model)
    if not info.is_main:
        return None
    return {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
        "model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
        "config": to_dict(cfg), "world_size": info.world_size,
        "rng": [{"cpu": r["cpu"].cpu(), "cuda": r["cuda"].cpu()} for r in rngs],
        "data": data_position(cfg, step, info.world_size),
        "preprocess": input_preprocess(cfg),
    }


def input_preprocess(cfg: Config) -> dict:
    """How the checkpoint's inputs were prepared, for ``d2v encode`` (the model folder's
    ``extra.preprocess``): the image normalisation and evaluation view of ``data.image.dataset``."""
    from d2v.data.transforms import image_eval_crop, image_stats

    if cfg.model.image is None:
        return {}
    mean, std = image_stats(cfg.data.image.dataset)
    crop = image_eval_crop(cfg.data.image.dataset)
    view = {"resize": int(cfg.model.image.input_size / crop), "crop": "center"} if crop < 1 else {"resize": None}
    return {"image": {"mean": list(mean), "std": list(std), **view}}


def config_diff(saved: Any, current: Any, prefix: str) -> list[str]:
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
                out.extend(config_diff(saved[k], current[k], key))
        return out
    if saved != current:
        return [f"{prefix} (checkpoint {saved!r}, now {current!r})"]
    return []


def load_checkpoint(path: str | Path, cfg: Config, map_location: str | torch.device = "cpu") -> dict:
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
    diffs = config_diff(saved_cfg["model"], to_dict(cfg)["model"], "model")
    if diffs:
        raise ConfigError(f"{path}: written for a different model configuration; {len(diffs)} differing "
                          f"key(s): {'; '.join(diffs[:12])}{' ...' if len(diffs) > 12 else ''}")
    return state


def resume_path(resume: bool | str | Path | None, default: Path, main: bool) -> Path | None:
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


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.empty(0, dtype=torch.uint8)
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def restore_rng(state: dict | None, cfg: Config, info: DistInfo) -> None:
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


def note_resume_differences(state: dict, cfg: Config, start: int, world_size: int) -> None:
    """Print what makes a resume not an exact continuation (other batch size, seed, data position)."""
    saved_train = state["config"].get("train", {}) if isinstance(state["config"].get("train"), dict) else {}
    now = to_dict(cfg)
    diffs = [d for k in _DATA_KEYS if k in saved_train for d in config_diff(saved_train[k], now["train"][k], f"train.{k}")]
    if state["config"].get("seed") != cfg.seed:
        diffs.append(f"seed (checkpoint {state['config'].get('seed')!r}, now {cfg.seed!r})")
    saved_pos = state.get("data")
    if isinstance(saved_pos, dict):
        diffs += config_diff(saved_pos, data_position(cfg, start, world_size), "data position")
    if diffs:
        print("note: not an exact continuation of the checkpoint's run (the batches differ): " + "; ".join(diffs[:8]),
              flush=True)
