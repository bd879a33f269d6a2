"""Small built-in pretraining data that needs no download (the ``data.source=sample`` default).

* image: scikit-learn's 1,797 handwritten digits (real scans, 8x8), upscaled to the model's
  input size and standardised;
* text: Python's own documentation (``pydoc_data.topics``, real English prose), as byte-level
  token ids (0 bos, 1 pad, 2 eos, 3 unk, byte b -> b + 4: vocabulary 260);
* speech: **synthetic** vowel-like sounds (a glottal pulse train through formant resonances,
  random pitch, vowel and loudness), 16 kHz, normalised per utterance as fairseq does.

Batches are a pure function of ``(seed, step, modality)`` so a resumed run sees exactly the
batches and masks an uninterrupted run would have seen.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from d2v.models.config import ModelConfig

BOS, PAD, EOS, UNK, BYTE_OFFSET = 0, 1, 2, 3, 4
TEXT_VOCAB = 256 + BYTE_OFFSET

# (F1, F2, F3) in Hz for a few vowels (Peterson & Barney averages, adult male).
_VOWELS = [(730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480), (570, 840, 2410), (660, 1720, 2410)]


def image_samples(n: int, size: int, in_chans: int, seed: int) -> torch.Tensor:
    from sklearn.datasets import load_digits

    x = torch.from_numpy(load_digits().images.astype(np.float32) / 16.0)  # (1797, 8, 8)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, x.shape[0], (n,), generator=g)
    x = F.interpolate(x[idx].unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    return x.expand(-1, in_chans, -1, -1).contiguous()


def text_samples(n: int, length: int, seed: int) -> torch.Tensor:
    from pydoc_data.topics import topics

    corpus = "\n".join(topics[k] for k in sorted(topics)).encode("utf-8")
    data = torch.frombuffer(bytearray(corpus), dtype=torch.uint8).long() + BYTE_OFFSET
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, data.numel() - length, (n,), generator=g)
    rows = torch.stack([data[s : s + length - 1] for s in starts.tolist()])
    return torch.cat([torch.full((n, 1), BOS, dtype=torch.long), rows], dim=1)


def speech_samples(n: int, seconds: float, seed: int, sample_rate: int = 16000) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    t_len = int(seconds * sample_rate)
    t = np.arange(t_len) / sample_rate
    out = np.empty((n, t_len), dtype=np.float32)
    for i in range(n):
        f0 = rng.uniform(80, 250) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.5, 3) * t))  # vibrato
        phase = 2 * np.pi * np.cumsum(f0) / sample_rate
        formants = _VOWELS[rng.integers(len(_VOWELS))]
        wav = np.zeros(t_len)
        for h in range(1, int(4000 / f0.max())):
            fh = h * f0.mean()
            gain = sum(1.0 / (1 + ((fh - f) / (0.1 * f)) ** 2) for f in formants) / h
            wav += gain * np.sin(h * phase)
        env = np.minimum(1, np.minimum(t, t[-1] - t) / 0.05)  # 50 ms fades
        wav = wav * env + 0.01 * rng.standard_normal(t_len)
        out[i] = wav
    x = torch.from_numpy(out)
    return F.layer_norm(x, x.shape[-1:])  # per-utterance standardisation (fairseq normalize=True)


class SampleData:
    """In-memory pools per modality; ``batch(modality, step)`` draws a deterministic batch."""

    def __init__(self, model_cfg: ModelConfig, modalities: list[str], num_samples: int, seed: int,
                 audio_seconds: float = 1.0, text_length: int = 64):
        self.seed = seed
        self.pools: dict[str, torch.Tensor] = {}
        for m in modalities:
            if m == "image":
                im = model_cfg.image
                self.pools[m] = image_samples(num_samples, im.input_size, im.in_chans, seed)
            elif m == "text":
                if model_cfg.text.vocab_size < TEXT_VOCAB:
                    raise ValueError(f"sample text needs model.text.vocab_size >= {TEXT_VOCAB}, got {model_cfg.text.vocab_size}")
                self.pools[m] = text_samples(num_samples, text_length, seed)
            elif m == "speech":
                self.pools[m] = speech_samples(num_samples, audio_seconds, seed, model_cfg.speech.sample_rate)
            else:
                raise ValueError(f"unknown modality {m!r}")

    def batch(self, modality: str, step: int, batch_size: int, rank: int = 0) -> torch.Tensor:
        # No hash() of strings: it is salted per process, which would break exact resumption.
        g = step_generator(self.seed, step, rank, salt=1 + ("image", "speech", "text").index(modality))
        pool = self.pools[modality]
        idx = torch.randint(0, pool.shape[0], (batch_size,), generator=g)
        return pool[idx]


def step_generator(seed: int, step: int, rank: int = 0, salt: int = 0) -> torch.Generator:
    """A CPU generator for per-step randomness (masks) that survives a resume."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + rank * 131 + salt) % (2**62))
