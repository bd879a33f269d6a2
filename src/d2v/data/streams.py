"""Pretraining batches: one ``Batch(source, mask, padding_mask)`` per step and micro-batch, resumable.

Two sources, one interface (:class:`PretrainData.next_batch`):

* ``data.source=sample``: batches and masks are a pure function of ``(seed, step)``. Every rank
  draws the same global batch and its global ``(B*M, T)`` masks (sample-major) and keeps rows
  ``[r*b, (r+1)*b)`` (masks ``[r*b*M, (r+1)*b*M)``), so W processes see what one process sees.
* ``data.source=shards``: each rank reads its own resampled WebDataset stream per modality
  (:func:`d2v.data.loaders.make_train_loader`, masks drawn in the loader workers). A stream is
  re-created at every checkpoint boundary (a *segment*: every ``train.ckpt_every`` steps; one
  segment when it is 0), seeded by (seed, rank, segment start, modality). A resumed run re-creates
  its segment's stream and skips the batches already consumed, so it reads exactly what an
  uninterrupted run would.

Steps go round robin over ``train.modalities``: step ``s`` uses ``modalities[s % n]``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from d2v.data.loaders import Batch
from d2v.data.sample import SampleData, step_generator
from d2v.models import masking

_MODALITY_SALT = {"image": 1, "speech": 2, "text": 3}


# ------------------------------------------------------------------------------ positions
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


def data_position(cfg: Any, step: int, world_size: int) -> dict[str, Any]:
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
            "segment_batches_consumed": {m: batches_in(seg, step, m, t.modalities, t.grad_accum)
                                         for m in t.modalities},
            "stream_seeds": {m: [stream_seed(cfg.seed, r, seg, m) for r in range(world_size)]
                             for m in t.modalities},
        })
    return pos


# ------------------------------------------------------------------------------ sources
class ShardStreams:
    """This rank's shard stream per modality, re-created at every segment start.

    A stream made for segment ``[s, e)`` yields exactly the micro-batches its modality needs
    there; made mid-segment (a resume), it first skips what the steps ``[s, step)`` consumed.
    """

    def __init__(self, cfg: Any, rank: int, batch_size: int):
        self.cfg, self.rank, self.batch_size = cfg, rank, batch_size
        self.segment: int | None = None
        self.iters: dict[str, Any] = {}

    def next(self, modality: str, step: int) -> Batch:
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


class PretrainData:
    """What one rank trains on: ``next_batch(modality, step, micro)`` -> this rank's ``Batch``."""

    def __init__(self, cfg: Any, rank: int, world_size: int):
        t = cfg.train
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.batch = t.per_rank_batch(world_size)
        self.sample: SampleData | None = None
        self.streams: ShardStreams | None = None
        if cfg.data.source == "sample":
            self.sample = SampleData(cfg.model, t.modalities, cfg.data.num_samples, cfg.seed,
                                     cfg.data.audio_seconds, cfg.data.text_length)
        else:
            self.streams = ShardStreams(cfg, rank, self.batch)

    def next_batch(self, modality: str, step: int, micro: int = 0) -> Batch:
        if self.streams is not None:
            batch = self.streams.next(modality, step)
        else:
            batch = self._sample_batch(modality, step, micro)
        if modality == "text":  # the model's pad id, not the tokenizer's constant
            batch.padding_mask = batch.source.eq(self.cfg.model.text.pad_idx)
        return batch

    def _sample_batch(self, modality: str, step: int, micro: int) -> Batch:
        # The global batch and its global masks, then this rank's rows (sample-major masks).
        cfg, t = self.cfg, self.cfg.train
        idx = step * t.grad_accum + micro
        src = self.sample.batch(modality, idx, t.batch_size)
        mcfg = getattr(cfg.model, modality)
        length = masking.num_tokens(modality, mcfg, tuple(src.shape))
        M = cfg.model.clone_batch
        mask = masking.make_mask(modality, mcfg, t.batch_size * M, length, step_generator(cfg.seed, idx, salt=17))
        if self.world_size > 1:
            r, b = self.rank, self.batch
            src, mask = src[r * b:(r + 1) * b], mask[r * b * M:(r + 1) * b * M]
        labels = torch.full((src.shape[0],), -1)
        return Batch(src, labels, [], mask)
