"""This project's model folder: the one format that training, conversion, encoding and serving share.

A model folder ``DIR`` holds:

* ``DIR/config.json``::

      {"format": "d2v-model/1",
       "model": {...},            # ModelConfig as a plain dict (dataclasses.asdict)
       "source": "pretrain",      # free text: "pretrain", "fairseq:<file>", ...
       "tokenizer": {...} | null, # how text lines become ids (see below); absent/null: no text tokenizer
       "extra": {...}}            # optional, free

* ``DIR/weights.pt``: ``Data2Vec2.state_dict()`` (student and EMA teacher, CPU tensors) written with
  ``torch.save`` and read back with ``torch.load(weights_only=True)``: loading never unpickles code.
* optionally the tokenizer file named by ``config.json["tokenizer"]["file"]``:
  ``spm.model`` (sentencepiece, ``{"type": "spm", "file": "spm.model"}``) or ``dict.txt`` (a fairseq
  dictionary, ``{"type": "fairseq_dict", "file": "dict.txt"}``, for converted text models; with
  GPT-2 BPE files ``encoder.json`` + ``vocab.bpe`` beside it when the checkpoint needs them).
  ``{"type": "bytes"}`` is the built-in byte-level tokenizer of ``data.source=sample`` (no file).

``save_model_dir`` writes a folder atomically (a temp folder, then a rename). ``load_model_dir``
reads a folder, a pretraining checkpoint (``models/pretrain/checkpoint.pt``: a dict with ``model``,
``config``, ``optimizer``, ``step`` ...) or a fairseq ``data2vec_multi`` checkpoint (converted on the
fly); every failure is an ``InputError`` naming the path. ``convert_fairseq`` writes a fairseq
checkpoint out as a folder (``d2v convert``).

This module knows no project layout: where a project keeps its tokenizer is the caller's to say
(``load_model_dir(..., tokenizer_fallback=...)``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from d2v.errors import ConfigError, InputError
from d2v.io import atomic_dir, save_torch, torch_load_checked

from .config import ModelConfig

FORMAT = "d2v-model/1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.pt"
SPM_FILE = "spm.model"
DICT_FILE = "dict.txt"
BPE_FILES = ("encoder.json", "vocab.bpe")

TokenizerArg = str | Path | Mapping[str, Any] | None


# ------------------------------------------------------------------------------------ configs
def model_config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def model_config_from_dict(d: Mapping[str, Any], where: str = "model") -> ModelConfig:
    """Typed merge of a plain dict onto ``ModelConfig`` (unknown keys / wrong types name the key)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if not isinstance(d, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(d).__name__}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), dict(d))
        cfg: ModelConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        msg = str(e).splitlines()[0]
        raise ConfigError(f"{where}.{key}: {msg}" if key else f"{where}: {msg}") from e
    return cfg.validate()


# ------------------------------------------------------------------------------------ weights check
def check_state_dict(model: torch.nn.Module, sd: Mapping[str, Any], where: str) -> None:
    """Raise ``InputError`` listing missing/unexpected keys and shape mismatches, else return."""
    own = model.state_dict()
    missing = sorted(k for k in own if k not in sd)
    unexpected = sorted(k for k in sd if k not in own)
    bad = sorted(
        f"{k}: file {tuple(sd[k].shape)} vs config {tuple(own[k].shape)}"
        for k in sd if k in own and (not isinstance(sd[k], torch.Tensor) or tuple(sd[k].shape) != tuple(own[k].shape))
    )
    if missing or unexpected or bad:
        def show(xs: list[str]) -> str:
            return ", ".join(xs[:20]) + (f", ... ({len(xs)} in all)" if len(xs) > 20 else "")

        raise InputError(
            f"{where}: weights do not match the model config:"
            + (f"\n  missing keys: {show(missing)}" if missing else "")
            + (f"\n  unexpected keys: {show(unexpected)}" if unexpected else "")
            + (f"\n  shape mismatches: {show(bad)}" if bad else "")
        )


# ------------------------------------------------------------------------------------ tokenizer
def _tokenizer_entry(tokenizer: TokenizerArg, tmp: Path) -> dict[str, Any] | None:
    """Copy the tokenizer file(s) into ``tmp``; return the ``config.json["tokenizer"]`` entry."""
    if tokenizer is None:
        return None
    if isinstance(tokenizer, Mapping):
        kind = tokenizer.get("type")
        if kind == "bytes":
            return {"type": "bytes"}
        src = tokenizer.get("path") or tokenizer.get("file")
        if kind not in ("spm", "fairseq_dict") or not src:
            raise InputError(f"tokenizer: unknown entry {dict(tokenizer)!r}")
        tokenizer = Path(src)
    if isinstance(tokenizer, str) and tokenizer == "bytes":
        return {"type": "bytes"}
    p = Path(tokenizer)
    if not p.is_file():
        raise InputError(f"{p}: tokenizer file not found")
    if p.suffix == ".txt":
        shutil.copyfile(p, tmp / DICT_FILE)
        entry: dict[str, Any] = {"type": "fairseq_dict", "file": DICT_FILE}
        bpe = [p.parent / f for f in BPE_FILES]
        if all(f.is_file() for f in bpe):
            for f in bpe:
                shutil.copyfile(f, tmp / f.name)
            entry["bpe"] = "gpt2"
        return entry
    shutil.copyfile(p, tmp / SPM_FILE)
    return {"type": "spm", "file": SPM_FILE}


# ------------------------------------------------------------------------------------ save
def save_model_dir(model: torch.nn.Module, out_dir: str | Path, *, tokenizer: TokenizerArg = None,
                   source: str = "", extra: dict | None = None) -> Path:
    """Write ``model`` (a ``Data2Vec2``) as a model folder; atomic (temp folder, then rename).

    ``tokenizer``: ``None``; a path to ``spm.model`` or a fairseq ``dict.txt``; or ``"bytes"``.
    Returns the folder's path. An existing folder at ``out_dir`` is replaced.
    """
    for attr in ("module", "_orig_mod"):  # DDP / torch.compile wrappers
        while hasattr(model, attr) and isinstance(getattr(model, attr), torch.nn.Module) and not hasattr(model, "cfg"):
            model = getattr(model, attr)
    if not hasattr(model, "cfg") or not isinstance(model.cfg, ModelConfig):
        raise TypeError(f"save_model_dir needs a Data2Vec2 model, got {type(model).__name__}")
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        try:
            save_torch(sd, tmp / WEIGHTS_FILE)
        except OSError as e:
            kept = f"{out_dir} is unchanged" if out_dir.exists() else f"nothing was written to {out_dir}"
            msg = f"{out_dir}: could not write the model folder ({os.strerror(e.errno) if e.errno else e}); {kept}"
            raise (OSError(e.errno, msg) if e.errno else OSError(msg)) from e
        cfg = {
            "format": FORMAT,
            "model": model_config_to_dict(model.cfg),
            "source": source,
            "tokenizer": _tokenizer_entry(tokenizer, tmp),
        }
        if extra:
            cfg["extra"] = extra
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, default=str) + "\n")
    return out_dir


# ------------------------------------------------------------------------------------ load
def encoder_state(sd: Mapping[str, Any]) -> Mapping[str, Any]:
    """The ``Data2Vec2`` part of a pretraining state dict: a baseline objective's checkpoint
    (``train.objective=data2vec1|mae|bert``, :mod:`d2v.models.baselines`) holds it under
    ``backbone.``, beside the objective's own heads (MAE's pixel decoder, BERT's LM head), which
    fine-tuning, evaluation and encoding do not use."""
    if not isinstance(sd, Mapping) or not any(str(k).startswith("backbone.") for k in sd):
        return sd
    return {k[len("backbone."):]: v for k, v in sd.items() if str(k).startswith("backbone.")}


def _build(cfg_dict: Any, sd: Mapping[str, Any], where: str, map_location: str):
    from .data2vec2 import Data2Vec2

    try:
        cfg = model_config_from_dict(cfg_dict, where=f"{where}: model")
    except ConfigError as e:
        raise InputError(f"{e}") from e
    model = Data2Vec2(cfg)
    if not isinstance(sd, Mapping):
        raise InputError(f"{where}: the weights are not a state dict (got {type(sd).__name__})")
    check_state_dict(model, sd, where)
    model.load_state_dict(dict(sd), strict=True)
    return model.to(map_location).eval()


def _resolve_tokenizer(entry: Any, folder: Path, where: str) -> dict[str, Any] | None:
    if entry is None:
        return None
    if not isinstance(entry, Mapping) or entry.get("type") not in ("spm", "fairseq_dict", "bytes"):
        raise InputError(f"{where}: config.json 'tokenizer' is not understood: {entry!r}")
    out = dict(entry)
    if out["type"] != "bytes":
        f = folder / str(out.get("file", ""))
        if not f.is_file():
            raise InputError(f"{where}: tokenizer file {f} is missing")
        out["path"] = str(f.resolve())
    return out


def _load_folder(folder: Path, map_location: str):
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file():
        raise InputError(f"{folder}: not a d2v model folder (no {CONFIG_FILE})")
    try:
        meta = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{cfg_path}: not valid JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise InputError(f"{cfg_path}: not a d2v model config (format {got!r}, expected {FORMAT!r})")
    if "model" not in meta:
        raise InputError(f"{cfg_path}: no 'model' section")
    w = folder / WEIGHTS_FILE
    if not w.is_file():
        raise InputError(f"{folder}: {WEIGHTS_FILE} is missing")
    sd = torch_load_checked(w)
    model = _build(meta["model"], sd, str(w), map_location)
    info = {
        "format": FORMAT, "kind": "folder", "path": str(folder), "model": meta["model"],
        "source": meta.get("source", ""), "extra": meta.get("extra") or {},
        "tokenizer": _resolve_tokenizer(meta.get("tokenizer"), folder, str(cfg_path)),
    }
    return model, info


def _project_tokenizer(ckpt: Path, config: Mapping[str, Any], model_cfg: ModelConfig,
                       fallback: Path | None = None) -> dict[str, Any] | None:
    """The tokenizer a pretraining checkpoint was trained with (text models only): byte-level for
    ``data.source=sample``, else ``spm.model`` beside the checkpoint, else the ``fallback`` file."""
    if model_cfg.text is None:
        return None
    data = config.get("data") if isinstance(config.get("data"), Mapping) else {}
    if data.get("source", "sample") == "sample":
        return {"type": "bytes"}
    for cand in (ckpt.parent / SPM_FILE, *([Path(fallback)] if fallback is not None else [])):
        if cand.is_file():
            return {"type": "spm", "file": SPM_FILE, "path": str(cand.resolve())}
    return None


def _load_file(path: Path, map_location: str, tokenizer_fallback: Path | None = None):
    if path.name == WEIGHTS_FILE and (path.parent / CONFIG_FILE).is_file():
        return _load_folder(path.parent, map_location)
    from .fairseq_compat import FAIRSEQ_SAFE_GLOBALS, is_fairseq_checkpoint

    with torch.serialization.safe_globals(FAIRSEQ_SAFE_GLOBALS):  # inert stand-ins, see fairseq_compat
        obj = torch_load_checked(path)
    if is_fairseq_checkpoint(obj):
        return _load_fairseq(path, obj, map_location)
    if not (isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping) and isinstance(obj.get("config"), Mapping)
            and isinstance(obj["config"].get("model"), Mapping)):
        keys = sorted(map(str, obj.keys()))[:12] if isinstance(obj, Mapping) else type(obj).__name__
        raise InputError(f"{path}: not a d2v model (expected a model folder or a pretraining checkpoint with "
                         f"'model' and 'config', got {keys})")
    config = obj["config"]
    train = config.get("train") if isinstance(config.get("train"), Mapping) else {}
    objective = str(train.get("objective", "data2vec2"))
    model = _build(config["model"], encoder_state(obj["model"]), str(path), map_location)
    extra: dict[str, Any] = {"step": obj.get("step"), "objective": objective}
    if isinstance(obj.get("preprocess"), Mapping):  # how its inputs were prepared (d2v encode does the same)
        extra["preprocess"] = dict(obj["preprocess"])
    info = {
        "format": FORMAT, "kind": "checkpoint", "path": str(path), "model": model_config_to_dict(model.cfg),
        "source": f"pretrain:{path.name}", "extra": extra,
        "tokenizer": _project_tokenizer(path, config, model.cfg, tokenizer_fallback),
    }
    return model, info


def _load_fairseq(path: Path, obj: Mapping[str, Any], map_location: str):
    """A fairseq data2vec 2.0 checkpoint, converted in memory (``d2v convert`` writes it out)."""
    from .fairseq_compat import fairseq_preprocess, model_from_fairseq_checkpoint, plain_fairseq_checkpoint

    ck = plain_fairseq_checkpoint(obj, str(path))
    model, meta = model_from_fairseq_checkpoint(ck, str(path))
    tok = None
    if model.cfg.text is not None and (path.parent / DICT_FILE).is_file():
        tok = {"type": "fairseq_dict", "file": DICT_FILE, "path": str((path.parent / DICT_FILE).resolve())}
        if all((path.parent / f).is_file() for f in BPE_FILES):
            tok["bpe"] = "gpt2"
    info = {
        "format": FORMAT, "kind": "fairseq", "path": str(path), "model": model_config_to_dict(model.cfg),
        "source": f"fairseq:{path.name}", "extra": {"preprocess": fairseq_preprocess(model.cfg)}, "tokenizer": tok,
    }
    return model.to(map_location), info


def load_model_dir(path: str | Path, map_location: str = "cpu", *,
                   tokenizer_fallback: None | str | Path = None):
    """Load a model folder or a pretraining checkpoint file -> ``(Data2Vec2 in eval mode, info)``.

    A fairseq data2vec 2.0 checkpoint is accepted too (converted in memory, its ``dict.txt`` looked
    for beside it). ``info`` holds ``format``, ``kind`` (folder|checkpoint|fairseq), ``path``, ``model`` (the config dict),
    ``source``, ``extra`` and ``tokenizer`` (``None`` or a dict with ``type`` and, for file-based
    tokenizers, the absolute ``path``). ``tokenizer_fallback``: the ``spm.model`` of a pretraining
    checkpoint's text model when none lies beside the checkpoint (the project's tokenizer stage output).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such model folder or checkpoint file")
    if path.is_dir():
        return _load_folder(path, map_location)
    return _load_file(path, map_location, Path(tokenizer_fallback) if tokenizer_fallback is not None else None)


# ------------------------------------------------------------------------------------ fairseq
def convert_fairseq(checkpoint, out_dir, *, dictionary=None, teacher_from_student: bool = False) -> Path:
    """``d2v convert --from-fairseq``: a fairseq data2vec 2.0 checkpoint -> a d2v model folder.

    ``dictionary``: the fairseq ``dict.txt`` of a text model (its size is checked against the
    embedding; GPT-2 BPE ``encoder.json`` + ``vocab.bpe`` beside it are copied too). Returns the
    folder. Errors (not data2vec 2.0, truncated, refused pickle, key/shape mismatch) are
    ``InputError`` naming the file.
    """
    from .fairseq_compat import (
        _sha256,
        fairseq_preprocess,
        load_fairseq_checkpoint,
        model_from_fairseq_checkpoint,
        read_fairseq_dictionary,
    )

    checkpoint = Path(checkpoint)
    ck = load_fairseq_checkpoint(checkpoint)
    model, meta = model_from_fairseq_checkpoint(ck, str(checkpoint), teacher_from_student=teacher_from_student)
    tokenizer = None
    if dictionary is not None:
        if model.cfg.text is None:
            raise InputError(f"{dictionary}: a dictionary was given but {checkpoint} is not a text model")
        syms = read_fairseq_dictionary(dictionary)
        if len(syms) != model.cfg.text.vocab_size:
            raise InputError(f"{dictionary}: {len(syms)} symbols (4 specials + {len(syms) - 5} lines + <mask>) but the "
                             f"checkpoint's embedding has {model.cfg.text.vocab_size} rows")
        tokenizer = Path(dictionary)
    extra = {
        "fairseq": {"file": checkpoint.name, "sha256": _sha256(checkpoint), "modality": meta["modality"],
                    "num_updates": meta["num_updates"], "teacher": meta["teacher"], "model_cfg": meta["fairseq_model_cfg"]},
        "preprocess": fairseq_preprocess(model.cfg),
    }
    return save_model_dir(model, out_dir, tokenizer=tokenizer, source=f"fairseq:{checkpoint.name}", extra=extra)
