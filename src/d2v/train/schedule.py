"""Learning-rate schedule shared by pretraining and fine-tuning."""

from __future__ import annotations

import math


def lr_at(step: int, base: float, warmup: int, total: int, min_lr: float = 0.0) -> float:
    """Linear warm-up from 0 to ``base`` over ``warmup`` steps, then cosine to ``min_lr``
    (fairseq's ``cosine`` lr scheduler with ``warmup_updates``)."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))
