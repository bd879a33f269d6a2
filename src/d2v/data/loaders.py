"""Batches from the shards: resampled, shuffled, DDP-safe training streams; exact eval passes.

Training: every rank (and worker) draws shards at random with replacement (resampled), from
a seed of its own, so no rank runs dry and each epoch is a fixed number of batches on every rank
(``with_epoch``); a stream is a pure function of its seed (exact resumption). Evaluation: one pass over the split's
shards, split by node then by worker,
in order. Decoding and augmentation per modality:

* image: JPEG/PNG -> float in [0,1] -> (train) random-resized-crop + horizontal flip -> normalised;
* speech: FLAC -> float waveform -> per-utterance standardisation -> crop to the batch's
  shortest clip (random offset in training; fairseq crops rather than pads) -> capped length;

(decoding and normalisation: :mod:`d2v.data.transforms`; token counts and masks: :mod:`d2v.models.masking`)
* text: sentencepiece ids -> (train) packed into fixed-length blocks with ``<s>`` in front;
  (eval) one padded row per line.

Masks can be drawn in the loader workers (``mask_fn``), so the training step never waits for them.
"""

from __future__ import annotations

import functools
import io
import json
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from d2v.data import transforms
from d2v.data.tokenizer import BOS, PAD
from d2v.errors import InputError

MaskFn = Callable[[int, int], torch.Tensor]  # (rows, tokens) -> bool mask


@dataclass
class Batch:
    source: torch.Tensor
    label: torch.Tensor
    keys: list[str]
    mask: torch.Tensor | None = None
    padding_mask: torch.Tensor | None = None


def check_key(sample: dict) -> dict:
    key = sample.get("__key__", "")
    if key.startswith("/") or ".." in key.split("/"):
        raise InputError(f"{sample.get('__url__', '?')}: tar member {key!r} escapes the shard")
    return sample


# ---------------------------------------------------------------------------------- collation
class ImageCollate:
    def __init__(self, size: int, in_chans: int, train: bool, seed: int = 0, mask_fn: MaskFn | None = None,
                 tokens: int = 0, mean: float | Sequence[float] = transforms.IMAGE_MEAN,
                 std: float | Sequence[float] = transforms.IMAGE_STD):
        self.size, self.in_chans, self.train, self.mask_fn, self.tokens = size, in_chans, train, mask_fn, tokens
        self.mean, self.std = mean, std
        self.rng = random.Random(seed)

    def __call__(self, samples: list[dict]) -> Batch:
        xs = []
        for s in samples:
            x = transforms.decode_image(transforms.image_bytes(s), f"sample {s['__key__']}")
            if self.train:
                x = transforms.random_resized_crop(x, self.size, self.rng)
                if self.rng.random() < 0.5:
                    x = x.flip(-1)
            xs.append(transforms.image_tensor(x, self.size, self.in_chans, self.mean, self.std))
        src = torch.stack(xs)
        mask = self.mask_fn(len(samples), self.tokens) if self.mask_fn else None
        return Batch(src, torch.tensor([int(s["cls"]) for s in samples]), [s["__key__"] for s in samples], mask)


class SpeechCollate:
    def __init__(self, sample_rate: int, max_samples: int, train: bool, seed: int = 0,
                 mask_fn: MaskFn | None = None, frames: Callable[[int], int] | None = None):
        self.sample_rate, self.max_samples, self.train = sample_rate, max_samples, train
        self.mask_fn, self.frames = mask_fn, frames
        self.rng = random.Random(seed)

    def __call__(self, samples: list[dict]) -> Batch:
        wavs = [transforms.decode_audio(s["flac"], f"sample {s['__key__']}", self.sample_rate) for s in samples]
        length = min(min(w.numel() for w in wavs), self.max_samples)
        out = []
        for w in wavs:  # crop to the shortest (fairseq pretraining: no padding)
            start = self.rng.randint(0, w.numel() - length) if self.train else 0
            out.append(w[start : start + length])
        src = torch.stack(out)
        mask = self.mask_fn(len(samples), self.frames(length)) if self.mask_fn and self.frames else None
        return Batch(src, torch.tensor([int(s["cls"]) for s in samples]), [s["__key__"] for s in samples], mask)


class TextCollate:
    """Eval: one row per line, right-padded with <pad>; ids capped at ``length``."""

    def __init__(self, length: int):
        self.length = length

    def __call__(self, samples: list[dict]) -> Batch:
        src = transforms.pad_rows([transforms.text_ids(s["ids.npy"], self.length) for s in samples])
        return Batch(src, torch.tensor([int(s["cls"]) for s in samples]), [s["__key__"] for s in samples],
                     padding_mask=src.eq(PAD))


def pack_text_blocks(src: Iterator[dict], length: int) -> Iterator[dict]:
    """Concatenate the ids of consecutive lines and cut blocks of ``length`` (with <s> first)."""
    buf: list[int] = []
    n = 0
    for s in src:
        buf.extend(np.asarray(s["ids.npy"]).tolist())
        while len(buf) >= length - 1:
            block = np.asarray([BOS] + buf[: length - 1], dtype=np.int64)
            buf = buf[length - 1 :]
            n += 1
            yield {"__key__": f"block{n}", "ids": block, "cls": -1}


def collate_blocks(mask_fn: MaskFn | None) -> Callable[[list[dict]], Batch]:
    def fn(samples: list[dict]) -> Batch:
        src = torch.from_numpy(np.stack([s["ids"] for s in samples]))
        mask = mask_fn(len(samples), src.shape[1]) if mask_fn else None
        return Batch(src, torch.full((len(samples),), -1), [s["__key__"] for s in samples], mask,
                     padding_mask=src.eq(PAD))

    return fn


# ---------------------------------------------------------------------------------- pipelines
_DECODERS: dict[str, Callable[[bytes], Any]] = {
    "cls": lambda b: int(b.decode("ascii")),
    "ids.npy": lambda b: np.load(io.BytesIO(b), allow_pickle=False),  # never unpickle a shard's arrays
    "json": json.loads,
    "txt": lambda b: b.decode("utf-8"),
}


def decode_sample(sample: dict) -> dict:
    out = dict(sample)
    for name, fn in _DECODERS.items():
        if name in out and isinstance(out[name], bytes):
            try:
                out[name] = fn(out[name])
            except (ValueError, TypeError, OSError, EOFError) as e:  # incl. UnicodeDecodeError, JSONDecodeError
                raise InputError(f"{sample.get('__url__', '?')}: sample {sample.get('__key__', '?')!r}: "
                                 f"cannot decode its .{name} ({type(e).__name__}: {e})") from e
    return out


def shard_error(exn: Exception) -> bool:
    """WebDataset error handler: a d2v error passes through; an unreadable, truncated or non-tar
    shard becomes an ``InputError`` naming the shard (webdataset appends the URL to the args)."""
    args = getattr(exn, "args", ())
    url = args[-1] if len(args) >= 2 and isinstance(args[-1], str) else "?"
    if isinstance(exn, InputError):
        if len(args) < 2:
            raise exn
        # raised by this handler inside the tar reader, then given (stream, url) by its caller
        msg = str(args[0])
        raise InputError(url + msg[1:] if msg.startswith("?: ") else msg) from exn.__cause__
    msg = args[0] if args else exn
    raise InputError(f"{url}: unreadable or truncated shard ({type(exn).__name__}: {msg})") from exn


def worker_index() -> int:
    """The DataLoader worker this runs in (0 in the main process); module level so it pickles."""
    info = torch.utils.data.get_worker_info()
    return info.id if info is not None else 0


class SeededShuffle:
    """Sample shuffle buffer whose RNG is seeded by (seed, worker) when iteration starts.

    WebDataset's own ``.shuffle(rng=...)`` hands every forked worker a copy of one generator.
    """

    def __init__(self, bufsize: int, seed: int):
        self.bufsize, self.seed = bufsize, seed

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        # webdataset's _shuffle: the buffer grows by two per sample read (up to bufsize) and
        # starts yielding once it holds ``initial`` samples.
        rng = random.Random(self.seed * 1009 + worker_index())
        initial = min(100, self.bufsize)
        src = iter(src)
        buf: list[dict] = []
        for sample in src:
            buf.append(sample)
            if len(buf) < self.bufsize:
                nxt = next(src, None)
                if nxt is not None:
                    buf.append(nxt)
            if len(buf) >= initial:
                k = rng.randrange(len(buf))
                buf[k], buf[-1] = buf[-1], buf[k]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf


def train_loader(urls: list[str], modality: str, batch_size: int, collate: Callable[[list[dict]], Batch],
                 batches_per_epoch: int, seed: int, num_workers: int = 0, shuffle_buffer: int = 1000,
                 text_length: int = 0):
    """Infinite, resampled, shuffled stream cut into epochs of ``batches_per_epoch`` batches.

    A pure function of ``seed`` (and the shards): the shard sequence of each loader worker is
    drawn by ``ResampledShards(deterministic=True)`` from (seed, worker), the sample shuffle by
    (seed, worker), the workers' torch seeds by ``seed`` (not the global RNG, which is left
    alone), and the DataLoader returns the workers' batches in a fixed round-robin order.
    So two loaders built with the same arguments yield the same batches: exact resumption
    re-creates a stream and skips what was consumed. Every rank passes its own seed (no node
    splitting of an infinite resampled stream is needed).
    """
    import webdataset as wds

    stages: list[Any] = [
        wds.ResampledShards(urls, seed=seed, worker_seed=worker_index, deterministic=True),
        wds.tarfile_to_samples(handler=shard_error),
        wds.map(check_key),
        SeededShuffle(shuffle_buffer, seed),
        wds.map(decode_sample),
    ]
    if modality == "text":
        stages.append(functools.partial(pack_text_blocks, length=text_length))
    stages.append(wds.batched(batch_size, collation_fn=collate, partial=False))
    ds = wds.DataPipeline(*stages)
    # Its own generator: a DataLoader iterator otherwise draws its workers' base seed from the
    # global torch RNG, so making a stream would shift the dropout / mask-noise draws of training.
    loader = wds.WebLoader(ds, batch_size=None, num_workers=num_workers,
                           generator=torch.Generator().manual_seed(seed))
    return loader.with_epoch(batches_per_epoch)


def eval_loader(urls: list[str], batch_size: int, collate: Callable[[list[dict]], Batch], num_workers: int = 0,
                labelled_only: bool = False):
    """One exact pass over the shards (in order; each sample once across nodes and workers).

    ``labelled_only``: drop samples whose ``.cls`` is negative before anything else of them is
    decoded (the text training split is mostly unlabelled pretraining lines)."""
    import webdataset as wds

    ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node, handler=shard_error,
                        empty_check=False)
    ds = ds.map(check_key)
    if labelled_only:
        ds = ds.select(maybe_labelled)
    ds = ds.map(decode_sample).batched(batch_size, collation_fn=collate, partial=True)
    return wds.WebLoader(ds, batch_size=None, num_workers=num_workers)


def maybe_labelled(sample: dict) -> bool:
    """False only for a readable negative ``.cls`` (unlabelled); anything unreadable goes on to
    ``decode_sample``, which names the sample in its error."""
    try:
        return int(sample["cls"]) >= 0
    except (KeyError, ValueError, TypeError):
        return True


def make_train_loader(cfg: Any, modality: str, batch_size: int, batches_per_epoch: int, seed: int,
                      rank: int = 0, with_masks: bool = True):
    """The pretraining stream of one modality from ``cfg`` (a ``d2v.config.Config``)."""
    from d2v.data.shards import shard_urls
    from d2v.models import masking

    m = cfg.model
    mc = getattr(m, modality)
    urls = shard_urls(cfg.data.root, modality, "train")
    state: dict[str, Any] = {}

    def generator() -> torch.Generator:
        # One generator per loader worker process, seeded by (seed, rank, worker): workers
        # forked with the same state would otherwise draw identical masks.
        info = torch.utils.data.get_worker_info()
        wid = info.id if info is not None else -1
        if state.get("wid") != wid:
            state["wid"], state["gen"] = wid, torch.Generator().manual_seed((seed * 7919 + rank) * 131 + wid + 1)
        return state["gen"]

    def mask_fn(b: int, t: int) -> torch.Tensor:
        return masking.make_mask(modality, mc, b * m.clone_batch, t, generator())

    def tokens(samples: int) -> int:
        return masking.num_tokens(modality, mc, (samples,))

    mf = mask_fn if with_masks else None
    if modality == "image":
        mean, std = transforms.image_stats(cfg.data.image.dataset)
        collate = ImageCollate(mc.input_size, mc.in_chans, train=True, seed=seed + rank, mask_fn=mf,
                               tokens=masking.num_tokens("image", mc, ()), mean=mean, std=std)
    elif modality == "speech":
        collate = SpeechCollate(mc.sample_rate, int(cfg.data.audio_seconds * mc.sample_rate), train=True,
                                seed=seed + rank, mask_fn=mf, frames=tokens)
    else:
        collate = collate_blocks(mf)
    return train_loader(urls, modality, batch_size, collate, batches_per_epoch, seed + 1000 * rank,
                        num_workers=cfg.data.num_workers, text_length=cfg.data.text_length)
