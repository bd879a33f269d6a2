"""The EMA teacher's schedule and update (fairseq ``Data2VecMultiModel.set_num_updates``, ``get_annealed_rate``, ``EMAModule``).

fp32 master weights; ``t <- d*t + (1-d)*s`` with one fused ``_foreach`` call over all tensors;
buffers (the fixed image positions among them) are copied; the decay ramps linearly from
``start`` to ``end`` over ``anneal_steps`` updates and stays there; at 1.0 the teacher is frozen.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def ema_decay_at(step: int, start: float, end: float, anneal_steps: int) -> float:
    """fairseq ``get_annealed_rate``: linear from ``start`` at 0 to ``end`` at ``anneal_steps``."""
    if step >= anneal_steps or anneal_steps <= 0:
        return end
    return end - (end - start) * (1.0 - step / anneal_steps)


class EMAUpdater:
    """Pairs teacher tensors with the student tensors of the same name, once."""

    def __init__(self, teacher: nn.Module, student: nn.Module):
        sp = dict(student.named_parameters())
        sb = dict(student.named_buffers())
        self.t_params: list[torch.Tensor] = []
        self.s_params: list[torch.Tensor] = []
        self.t_copy: list[torch.Tensor] = []
        self.s_copy: list[torch.Tensor] = []
        for name, t in teacher.named_parameters():
            s = sp[name]
            if s.requires_grad:
                self.t_params.append(t)
                self.s_params.append(s)
            else:  # non-trainable parameters are copied, not averaged
                self.t_copy.append(t)
                self.s_copy.append(s)
        for name, t in teacher.named_buffers():
            if name in sb:
                self.t_copy.append(t)
                self.s_copy.append(sb[name])

    @torch.no_grad()
    def step(self, decay: float) -> None:
        if self.t_params:
            sp = [s.detach().to(t.dtype) for t, s in zip(self.t_params, self.s_params)]
            torch._foreach_mul_(self.t_params, decay)
            torch._foreach_add_(self.t_params, sp, alpha=1.0 - decay)
        for t, s in zip(self.t_copy, self.s_copy):
            t.copy_(s)
