"""Learning-rate schedules: cosine (pretraining and fine-tuning), tri-stage (speech fine-tuning)."""

from __future__ import annotations

import math


def lr_at(step: int, base: float, warmup: int, total: int, min_lr: float = 0.0) -> float:
    """Linear warm-up from 0 to ``base`` over ``warmup`` steps, then cosine to ``min_lr``
    (fairseq's ``cosine`` lr scheduler with ``warmup_updates``)."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def tri_stage_lr(step: int, base: float, total: int, phase_ratio: tuple[float, float, float] = (0.1, 0.4, 0.5),
                 final_lr: float = 0.0, init_lr_scale: float = 0.01) -> float:
    """fairseq's ``tri_stage`` scheduler (wav2vec 2.0 / data2vec fine-tuning, ``vox_10h.yaml``):
    linear warm-up from ``init_lr_scale * base`` to ``base``, hold, then exponential decay to
    ``final_lr`` (> 0) over the three phases' shares of ``total``; ``final_lr`` after that."""
    warmup, hold, decay = (int(r * total) for r in phase_ratio)
    init = init_lr_scale * base
    if step < warmup:
        return init + (base - init) * step / warmup
    step -= warmup
    if step < hold:
        return base
    step -= hold
    if step <= decay and decay > 0:
        return base * math.exp(math.log(final_lr / base) * step / decay)
    return final_lr
