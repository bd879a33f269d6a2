"""Health of the speech front-end during pretraining, read by a forward hook (numerics untouched).

The speech encoder's local features (CNN, then LayerNorm + Linear projection: what the student's
context encoder and the teacher are fed) can collapse to one vector per frame while the loss looks
healthy (fairseq issue #5239). Per micro-batch we record their mean, std, and the std of each
channel across frames (averaged over channels); training warns once when the frame std falls under
``LOCAL_COLLAPSE_RATIO`` of the overall std. Measured values are in BENCHMARKS.md ("Why speech
fine-tuning from pretraining stayed at chance").
"""

from __future__ import annotations

import sys

import torch

LOCAL_COLLAPSE_RATIO = 0.25


class SpeechFrontEndMonitor:
    """``start_step()``, run the forwards, then ``stats()`` -> ``(mean, std, frame_std)`` tensors or None."""

    def __init__(self, model: torch.nn.Module, enabled: bool):
        self._records: list[torch.Tensor] = []
        self._hook = None
        self.warned = False
        if enabled:
            self._hook = model.encoder("speech").project_features.register_forward_hook(self._record)

    def _record(self, _module, _inputs, output: torch.Tensor) -> None:
        o = output.detach().float()  # (B, T, D)
        frame_std = o.reshape(-1, o.shape[-1]).std(0).mean()
        self._records.append(torch.stack([o.mean(), o.std(), frame_std]))

    def start_step(self) -> None:
        self._records.clear()

    def stats(self) -> torch.Tensor | None:
        return torch.stack(self._records).mean(0) if self._records else None

    def check(self, step: int, mean: float, std: float, frame_std: float) -> None:
        """Warn (once, on stderr) when the frame std falls under a quarter of the overall std."""
        if self.warned or frame_std >= LOCAL_COLLAPSE_RATIO * std:
            return
        self.warned = True
        print(f"warning: step {step}: the speech local features (CNN + projection) barely vary "
              f"across frames (frame std {frame_std:.3g} vs overall std {std:.3g}): the local "
              f"encoder may have collapsed (fairseq #5239); model.speech.local_grad_mult=0 keeps "
              f"the CNN at its initialisation",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
