"""Labelled splits for the downstream tasks, decoded once from the shards into memory.

The embedded default's labelled sets are small (Fashion-MNIST, 35 spoken words, Rotten-Tomatoes
snippets), so fine-tuning draws its batches from tensors in memory: fast, exactly reproducible,
and the pretrained and random-init runs see identical batches. Shards are shuffled when they
are written, so the first ``max_n`` labelled samples are a uniform subset.

Decoding and normalisation are :mod:`d2v.data.transforms`, as in pretraining and ``d2v encode``:

* image: PNG -> [0, 1] -> resized to the model's input size -> normalised as in pretraining;
* speech: FLAC -> per-utterance standardised waveform -> centre-cropped or zero-padded to a
  fixed length; ``lengths`` keep the true sample counts (padding masks are built from them);
* text: ``<s>`` + sentencepiece ids, cut at ``text_length``, right-padded with ``<pad>``;
  unlabelled lines (``cls`` = -1: the pretraining corpus) are skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from d2v.data import transforms
from d2v.data.loaders import eval_loader
from d2v.data.shards import shard_dir, shard_urls
from d2v.errors import InputError


@dataclass
class LabelledSplit:
    modality: str
    split: str
    source: torch.Tensor  # (N, C, H, W) float | (N, L) float | (N, T) long
    label: torch.Tensor  # (N,) long
    keys: list[str]
    lengths: torch.Tensor | None = None  # speech: true samples per clip; text: tokens per row
    texts: list[str] | None = None  # speech: the transcript (metadata ``label``), the CTC target
    cropped: int = 0  # speech: clips longer than ``audio_seconds``, centre-cropped (CTC refuses them)

    def __len__(self) -> int:
        return int(self.label.numel())


def label_names(root: str | Path, modality: str) -> list[str]:
    """The class names in ``cls`` order, from the shard stage's summary."""
    path = shard_dir(root, modality) / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"shard summary not found: {path} (run `d2v shard --modality {modality}`)")
    return list(json.loads(path.read_text())["labels"])


def _identity(samples: list[dict]) -> list[dict]:
    return samples


def load_split(root: str | Path, modality: str, split: str, max_n: int = 0, *, image_size: int = 28,
               in_chans: int = 1, sample_rate: int = 16000, audio_seconds: float = 1.0,
               text_length: int = 64) -> LabelledSplit:
    """Decode the labelled samples of ``split`` (the first ``max_n`` when ``max_n`` > 0)."""
    urls = shard_urls(root, modality, split)
    xs: list[torch.Tensor] = []
    labels: list[int] = []
    keys: list[str] = []
    lengths: list[int] = []
    texts: list[str] = []
    cropped = 0
    target = int(round(audio_seconds * sample_rate))
    for chunk in eval_loader(urls, 256, _identity, labelled_only=True):
        for s in chunk:
            cls = int(s["cls"])
            if cls < 0:
                continue
            key = s["__key__"]
            if modality == "image":
                x = transforms.decode_image(s["png"], f"sample {key}")
                xs.append(transforms.image_tensor(x, image_size, in_chans))
            elif modality == "speech":
                w = transforms.decode_audio(s["flac"], f"sample {key}", sample_rate)
                n = w.numel()
                if n > target:  # centre crop: the word sits in the middle of its clip
                    start = (n - target) // 2
                    w, n = w[start : start + target], target
                    cropped += 1
                elif n < target:
                    w = F.pad(w, (0, target - n))
                xs.append(w)
                lengths.append(n)
                texts.append(_transcript(s, key))
            else:
                ids = transforms.text_ids(s["ids.npy"], text_length)
                xs.append(transforms.pad_rows([ids], text_length)[0])
                lengths.append(len(ids))
            labels.append(cls)
            keys.append(key)
            if max_n and len(labels) >= max_n:
                break
        if max_n and len(labels) >= max_n:
            break
    if not labels:
        raise InputError(f"{shard_dir(root, modality)}: split {split!r} has no labelled samples")
    return LabelledSplit(
        modality, split, torch.stack(xs), torch.tensor(labels, dtype=torch.long), keys,
        torch.tensor(lengths, dtype=torch.long) if lengths else None, texts or None, cropped,
    )


def _transcript(sample: dict, key: str) -> str:
    """The clip's transcript: the ``label`` of its JSON metadata (the word, or the LibriSpeech sentence)."""
    try:
        meta = sample["json"]
        return str((meta if isinstance(meta, dict) else json.loads(meta))["label"])
    except (KeyError, ValueError, TypeError) as e:
        raise InputError(f"{key}: shard sample has no readable JSON 'label' for its transcript ({e})") from e


def load_task_data(cfg: Any, task: str, split: str, max_n: int) -> LabelledSplit:
    """The labelled ``split`` of ``task`` decoded for ``cfg.model`` (sizes, sample rate, text length)."""
    tc = getattr(cfg.finetune, task)
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
