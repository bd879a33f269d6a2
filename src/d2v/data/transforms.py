"""Decoding and normalisation of one sample, per modality: the one place that says what the model sees.

Used by the pretraining loaders (:mod:`d2v.data.loaders`), the downstream splits
(:mod:`d2v.data.downstream`) and ``d2v encode`` (:mod:`d2v.inference.encode`), so a picture, a clip
or a line becomes the same tensor in all three.

* image: JPEG / PNG / uint8 array -> float ``(C, H, W)`` in [0, 1] -> resized to the model's size (bilinear)
  -> grey/RGB matched to ``in_chans`` -> ``(x - mean) / std`` with the dataset's statistics
  (:func:`image_stats`: Fashion-MNIST's own grey ones, else ImageNet's per-channel ones as MAE and
  fairseq use); training adds a random-resized crop and a flip;
* speech: FLAC/WAV -> mono float waveform at the model's sample rate -> per-utterance
  standardisation (fairseq's ``normalize=True``: ``F.layer_norm`` over the whole clip);
* text: ``<s>`` + token ids, cut at a length, right-padded with ``<pad>``.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Sequence
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F

from d2v.data.tokenizer import BOS, PAD
from d2v.errors import InputError

IMAGE_MEAN, IMAGE_STD = 0.2860, 0.3530  # Fashion-MNIST training pixels
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # RGB (MAE, fairseq MaeImageDataset)


def image_eval_crop(dataset: str) -> float:
    """The evaluation view of ``data.image.dataset``: 1.0 = the whole image resized to the model's
    size (Fashion-MNIST, already square); 0.875 = MAE's and timm's view of photos (the shorter side
    resized to size / 0.875, e.g. 256, then the centre size x size crop: no squashed aspect ratio)."""
    return 1.0 if dataset == "fashion_mnist" else 0.875


def resize_center_crop(x: torch.Tensor, size: int, crop: float) -> torch.Tensor:
    """``(C, H, W)`` -> ``(C, size, size)``: the shorter side resized to ``int(size / crop)``
    (bicubic, antialiased, as PIL's), then the centre crop (MAE ``main_finetune.build_transform``
    for eval: ``Resize(int(224 / 0.875), BICUBIC)`` + ``CenterCrop(224)``)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    x = TF.resize(x, int(size / crop), interpolation=InterpolationMode.BICUBIC, antialias=True)
    return TF.center_crop(x, [size, size])


def image_stats(dataset: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` per channel for ``data.image.dataset``: Fashion-MNIST's own grey statistics for
    ``fashion_mnist``; ImageNet's for photo folders (``imagenet_folder``, ``image_folder``), as MAE's
    and fairseq's pipelines normalise them, so a converted release checkpoint sees what it was trained on."""
    return ((IMAGE_MEAN,), (IMAGE_STD,)) if dataset == "fashion_mnist" else (IMAGENET_MEAN, IMAGENET_STD)


# ---------------------------------------------------------------------------------- image
def image_from_array(arr: np.ndarray) -> torch.Tensor:
    """uint8 ``(H, W)`` or ``(H, W, C)`` -> float ``(C, H, W)`` in [0, 1]."""
    x = torch.from_numpy(np.array(arr, dtype=np.float32, copy=True)).div_(255)
    return x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)


def pil_mode(mode: str) -> str:
    """The mode a PIL image is converted to: grey stays grey (incl. 1-bit and 16-bit), all else RGB."""
    return "L" if mode in ("L", "1", "I;16", "I;16B", "I;16L", "I", "F") else "RGB"


def image_bytes(sample: dict) -> bytes:
    """The encoded image of a shard sample (``jpg`` or ``png``, see :mod:`d2v.data.shards`)."""
    data = sample.get("jpg", sample.get("png"))
    if data is None:
        raise InputError(f"sample {sample.get('__key__', '?')}: no .jpg or .png image in the shard "
                         f"(it holds {sorted(k for k in sample if not k.startswith('__'))})")
    return data


def decode_image_uint8(data: bytes, where: str = "") -> torch.Tensor:
    """JPEG/PNG bytes -> uint8 ``(C, H, W)``, C = 1 (grey) or 3; a corrupt file is an ``InputError``
    naming ``where``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            mode = pil_mode(im.mode)
            arr = np.asarray(im if im.mode == mode else im.convert(mode))
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise InputError(f"{where}: cannot decode image (corrupt JPEG/PNG: {e})") from e
    x = torch.from_numpy(arr.copy())
    return x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)


def decode_image(data: bytes, where: str = "") -> torch.Tensor:
    """JPEG/PNG bytes -> float ``(C, H, W)`` in [0, 1] (see :func:`decode_image_uint8`)."""
    return decode_image_uint8(data, where).float().div_(255)


def resize_image(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of ``(C, H, W)`` to ``(C, size, size)`` (a no-op when it already is)."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x.unsqueeze(0), size=(size, size), mode="bilinear", align_corners=False)[0]


def match_channels(x: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Grey <-> RGB as the model's ``in_chans`` asks (the mean over channels, repeated)."""
    if x.shape[0] == in_chans or x.shape[0] not in (1, 3):
        return x
    return x.mean(0, keepdim=True).expand(in_chans, -1, -1)


def _channel_values(v: float | Sequence[float], channels: int, what: str) -> float | list[float]:
    """One value for every channel, or one per channel; RGB values on a grey image are averaged."""
    if isinstance(v, (int, float)):
        return float(v)
    vals = [float(a) for a in v]
    if len(vals) == 1 or (channels == 1 and len(vals) > 1):
        return sum(vals) / len(vals)
    if len(vals) != channels:
        raise ValueError(f"normalize_image: {len(vals)} {what} values for {channels} channels")
    return vals


def normalize_image(x: torch.Tensor, mean: float | Sequence[float] = IMAGE_MEAN,
                    std: float | Sequence[float] = IMAGE_STD) -> torch.Tensor:
    """``(x - mean) / std`` of ``(C, H, W)``: one value for all channels or one per channel
    (per-channel statistics on a grey image are averaged into one)."""
    m, s = _channel_values(mean, x.shape[0], "mean"), _channel_values(std, x.shape[0], "std")
    if isinstance(m, float) and isinstance(s, float):
        return (x - m) / s
    m_t = torch.tensor(m, dtype=torch.float32).expand(x.shape[0]).reshape(-1, 1, 1)
    s_t = torch.tensor(s, dtype=torch.float32).expand(x.shape[0]).reshape(-1, 1, 1)
    return ((x - m_t) / s_t).contiguous()


def random_resized_crop(x: torch.Tensor, size: int, rng: random.Random, scale=(0.2, 1.0),
                        ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """torchvision's ``RandomResizedCrop`` semantics on a (C, H, W) tensor, bilinear, from ``rng``
    (a seeded ``random.Random``, so a loader stream stays a pure function of its seed)."""
    _, h, w = x.shape
    area = h * w
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ar = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = rng.randint(0, h - ch), rng.randint(0, w - cw)
            x = x[:, top : top + ch, left : left + cw]
            break
    return F.interpolate(x.unsqueeze(0), size=(size, size), mode="bilinear", align_corners=False).squeeze(0)


def image_tensor(x: torch.Tensor, size: int, in_chans: int, mean=IMAGE_MEAN, std=IMAGE_STD) -> torch.Tensor:
    """Evaluation view of a decoded image: resized, channels matched, normalised."""
    return normalize_image(match_channels(resize_image(x, size), in_chans), mean, std)


# ---------------------------------------------------------------------------------- speech
def read_audio(src: str | BinaryIO | bytes, where: str, sample_rate: int) -> torch.Tensor:
    """A sound file (path, file object or bytes) -> mono float32 waveform ``(samples,)``.

    ``InputError`` naming ``where`` when it cannot be decoded, has another sample rate (we never
    resample silently) or holds NaN/Inf samples (float WAV/AIFF can).
    """
    import soundfile as sf

    if isinstance(src, (bytes, bytearray)):
        src = io.BytesIO(src)
    try:
        wav, sr = sf.read(src, dtype="float32", always_2d=True)
    except Exception as e:  # noqa: BLE001 - libsndfile raises several types
        raise InputError(f"{where}: cannot decode audio: {e}") from e
    if sr != sample_rate:
        raise InputError(f"{where}: sample rate {sr} Hz, the model expects {sample_rate} Hz (resample it first)")
    if not np.isfinite(wav).all():
        raise InputError(f"{where}: {int((~np.isfinite(wav)).sum())} NaN/Inf samples in the audio")
    return torch.from_numpy(wav.mean(axis=1))


def normalize_audio(x: torch.Tensor) -> torch.Tensor:
    """Per-utterance standardisation (fairseq's ``normalize=True``)."""
    return F.layer_norm(x, x.shape)


def decode_audio(flac: bytes, where: str = "", sample_rate: int = 16000) -> torch.Tensor:
    """A shard's FLAC bytes -> the standardised mono waveform the model is trained on."""
    return normalize_audio(read_audio(flac, where, sample_rate))


# ---------------------------------------------------------------------------------- text
def text_ids(ids: Sequence[int], length: int) -> np.ndarray:
    """``<s>`` + ids, cut at ``length`` (fairseq's ``PrependTokenDataset`` + truncation)."""
    return np.concatenate([[BOS], np.asarray(ids, dtype=np.int64)])[:length].astype(np.int64)


def pad_rows(rows: Sequence[np.ndarray | torch.Tensor], length: int = 0) -> torch.Tensor:
    """Right-pad id rows with ``<pad>`` into one ``(N, T)`` long tensor; ``T`` = ``length`` or the longest."""
    t = length or max(len(r) for r in rows)
    src = torch.full((len(rows), t), PAD, dtype=torch.long)
    for i, r in enumerate(rows):
        r = torch.as_tensor(r, dtype=torch.long)[:t]
        src[i, : len(r)] = r
    return src
