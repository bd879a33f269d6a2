"""Classifier folders: a fine-tuned head (``d2v.models.heads``) and its encoder, as ``d2v finetune`` writes them.

A classifier folder ``DIR`` holds ``DIR/config.json`` (``format`` ``d2v-classifier/1``, the model
config, the head: ``modality``, ``num_classes``, ``pool_norm``, ``head`` kind; plus the task's
metadata: ``task``, ``labels``, ...) and ``DIR/weights.pt`` (the head's state dict: the student's
encoder path of one modality and the head, read back with ``torch.load(weights_only=True)``).
Folders are written atomically: a crash or a full disk leaves the previous folder as it was.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from d2v.errors import InputError
from d2v.io import atomic_dir, save_torch, torch_load_checked

from .data2vec2 import Data2Vec2
from .heads import Classifier, head_class
from .model_dir import model_config_from_dict, model_config_to_dict

CLASSIFIER_FORMAT = "d2v-classifier/1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.pt"


def save_classifier(clf: Classifier, out_dir: Path, meta: dict[str, Any]) -> Path:
    """``config.json`` (model config, head, ``meta``) + ``weights.pt`` (state dict); atomic.

    An existing folder at ``out_dir`` is replaced; a failed write (``OSError`` naming the file)
    leaves it unchanged."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_torch(clf.state_dict(), tmp / WEIGHTS_FILE)  # a full disk is a clear OSError naming the file
        cfg = {"format": CLASSIFIER_FORMAT, "model": model_config_to_dict(clf.model_cfg), **clf.head_config(), **meta}
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
    return out_dir


def load_classifier(path: str | Path, map_location: str = "cpu") -> tuple[Classifier, dict]:
    """``(head, config.json as a dict)``; every failure an ``InputError`` naming the file."""
    path = Path(path)
    cfg_path, w_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not cfg_path.is_file() or not w_path.is_file():
        raise InputError(f"{path}: not a classifier folder (needs config.json and weights.pt; run `d2v finetune`)")
    try:
        meta = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{cfg_path}: not valid JSON: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != CLASSIFIER_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise InputError(f"{cfg_path}: format {got!r}, expected {CLASSIFIER_FORMAT!r}")
    backbone = Data2Vec2(model_config_from_dict(meta["model"], where=f"{cfg_path}: model"))
    clf = head_class(meta.get("head", "classify")).from_config(backbone, meta)
    state = torch_load_checked(w_path, map_location=map_location)
    if not isinstance(state, Mapping):
        raise InputError(f"{w_path}: not a state dict (got {type(state).__name__})")
    # Only the student path is kept: the teacher and decoders of the throwaway backbone are dropped.
    try:
        missing, unexpected = clf.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise InputError(f"{w_path}: weights do not match config.json: {str(e).strip().splitlines()[-1].strip()}") from e
    if missing or unexpected:
        raise InputError(f"{w_path}: weights do not match config.json: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return clf, meta
