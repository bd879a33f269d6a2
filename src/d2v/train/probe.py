"""Online evaluation during pretraining: a linear probe of frozen features every ``train.probe_every`` steps
and/or every ``train.probe_every_minutes`` of training.

As the online classifiers of SSL libraries (lightly, solo-learn), but cheap and outside the loss:
for each trained modality with labels, ``train.probe_train`` labelled training samples and
``train.probe_val`` labelled samples of ``train.probe_split`` (val) are decoded once from the
shards (the same splits, transforms and mean pooling over real tokens as ``d2v evaluate``'s probe);
at a probe the student encoder's mean-pooled last-block features are extracted in eval mode and
scored by a standardised logistic regression (:func:`linear_probe`, in torch: scikit-learn's import
alone took 3 s of every run). The model's mode and every RNG are restored, so a run with probes
trains exactly as one without.

A local encoder that pretraining keeps frozen (``local_grad_mult: 0``, the speech CNN of the tiny
model) gives the same output at every probe: it is run once per probe set and kept, and reused only
while its weights equal the snapshot taken then. The speech CNN was most of each probe's time.

Batch sizes on a CPU are cache-sized, not throughput-sized: each activation of the speech CNN's
first layers on 128 clips of 12,800 samples is 84 MB, out of cache before the next layer reads it,
so it runs 8 clips at a time (3.5x faster than 128 on the 2-core VM, BENCHMARKS.md "Online probe"),
and the transformer 32 rows at a time. On a GPU both are 128.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from d2v.config import Config
from d2v.data.downstream import LabelledSplit, load_task_data
from d2v.errors import InputError
from d2v.models import Data2Vec2


def linear_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                 c: float = 1.0) -> float:
    """Accuracy of a standardised multinomial logistic regression trained on frozen features.

    The model of scikit-learn's ``make_pipeline(StandardScaler(), LogisticRegression(C=c))``: features
    standardised with the training mean and (population) std, then ``C * sum(cross-entropy) + |W|^2 / 2``
    (intercept unpenalised) minimised by L-BFGS, in float64 torch. Same optimum, without
    scikit-learn's 3 s import in every pretraining run; ``tests/test_downstream.py`` checks it
    against scikit-learn. It stops where scikit-learn's default does (``tol=1e-4`` on the largest
    gradient entry of the mean loss ``sum / (C * N)``, so ``1e-4 * C * N`` here): a 100x tighter
    stop changed no probe's accuracy by more than one sample and took twice as long.
    """
    classes, y_idx = np.unique(y_train, return_inverse=True)
    if len(classes) < 2:
        raise InputError("linear probe: the training subset holds a single class")
    xt = torch.as_tensor(np.asarray(x_train), dtype=torch.float64)
    mean, std = xt.mean(0), xt.std(0, correction=0)
    std = torch.where(std > 0, std, torch.ones_like(std))  # StandardScaler leaves constant columns unscaled
    xt = (xt - mean) / std
    y = torch.as_tensor(y_idx, dtype=torch.long)
    w = torch.zeros(xt.shape[1], len(classes), dtype=torch.float64, requires_grad=True)
    b = torch.zeros(len(classes), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=2000, tolerance_grad=1e-4 * c * len(xt),
                            tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        opt.zero_grad()
        loss = c * torch.nn.functional.cross_entropy(xt @ w + b, y, reduction="sum") + 0.5 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(objective)
    with torch.no_grad():
        xe = (torch.as_tensor(np.asarray(x_test), dtype=torch.float64) - mean) / std
        pred = classes[(xe @ w + b).argmax(1).numpy()]
    return float((pred == np.asarray(y_test)).mean())


class OnlineProbe:
    """``probe(backbone) -> {modality: accuracy}``; ``seconds`` accumulates the time spent probing,
    ``load_seconds`` the one-off decoding of the probe sets."""

    def __init__(self, cfg: Config, device: torch.device, batch_size: int | None = None,
                 local_batch_size: int | None = None):
        t = cfg.train
        cpu = device.type == "cpu"
        self.cfg, self.device = cfg, device
        self.batch_size = batch_size or (32 if cpu else 128)
        self.local_batch_size = local_batch_size or (8 if cpu else 128)
        self.splits: dict[str, tuple[LabelledSplit, LabelledSplit]] = {}
        # (modality, id of the split) -> (the local encoder's weights, its output per batch)
        self._local: dict[tuple[str, int], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self.seconds = 0.0
        t0 = time.perf_counter()
        for m in t.modalities:
            try:
                with torch.random.fork_rng(devices=[]):  # a DataLoader iterator draws its seed from it
                    train = load_task_data(cfg, m, "train", t.probe_train)
                    val = load_task_data(cfg, m, t.probe_split, t.probe_val)
            except (InputError, FileNotFoundError) as e:
                raise InputError(f"train.probe_every={t.probe_every}: cannot probe {m}: {e} "
                                 f"(train.probe_every=0 turns the online probe off)") from e
            if len(torch.unique(train.label)) < 2:
                raise InputError(f"train.probe_every: the {m} shards' first {len(train)} labelled training "
                                 "samples hold a single class: raise train.probe_train")
            self.splits[m] = (train, val)
        self.load_seconds = time.perf_counter() - t0

    @torch.no_grad()
    def __call__(self, backbone: Data2Vec2) -> dict[str, float]:
        t0 = time.perf_counter()
        was_training = backbone.training
        backbone.eval()
        devices = [self.device] if self.device.type == "cuda" else []
        out: dict[str, float] = {}
        with torch.random.fork_rng(devices=devices):  # eval mode should draw nothing; be sure
            for m, (train, val) in self.splits.items():
                x_tr, x_va = self.pooled(backbone, m, train), self.pooled(backbone, m, val)
                out[m] = linear_probe(x_tr, train.label.numpy(), x_va, val.label.numpy())
        backbone.train(was_training)
        self.seconds += time.perf_counter() - t0
        return out

    @torch.no_grad()
    def pooled(self, backbone: Data2Vec2, modality: str, data: LabelledSplit) -> np.ndarray:
        """Mean over the real (unpadded) tokens of the last block's output, (N, D) float64."""
        enc = backbone.encoder(modality)
        local = self.frozen_local_outputs(enc, modality, data)
        rows = []
        for b, i in enumerate(range(0, len(data), self.batch_size)):
            src = data.source[i : i + self.batch_size]
            pad = None
            if data.lengths is not None:  # speech: samples -> frames; text: tokens
                n = data.lengths[i : i + self.batch_size]
                if modality == "speech":
                    n = torch.tensor([enc.local_encoder.output_length(int(k)) for k in n])
                t = enc.num_tokens(tuple(src.shape))
                pad = torch.arange(t).unsqueeze(0) >= n.unsqueeze(1)
            f = backbone.features(src.to(self.device), modality, padding_mask=pad,
                                  local_out=None if local is None else local[b])
            if f.padding_mask is None:
                rows.append(f.x.float().mean(1))
            else:
                keep = (~f.padding_mask).unsqueeze(-1).float()
                rows.append((f.x.float() * keep).sum(1) / keep.sum(1).clamp_min(1))
        return torch.cat(rows).cpu().numpy().astype(np.float64)

    @torch.no_grad()
    def frozen_local_outputs(self, enc, modality: str, data: LabelledSplit) -> list[torch.Tensor] | None:
        """``enc.local_encoder`` of each batch of ``data``, kept while its weights stay as they were;
        None when pretraining trains that local encoder (nothing to keep)."""
        if enc.mcfg.local_grad_mult != 0.0:
            return None
        weights = [t.detach() for t in (*enc.local_encoder.parameters(), *enc.local_encoder.buffers())]
        key = (modality, id(data))
        kept = self._local.get(key)
        if kept is not None and len(kept[0]) == len(weights) and all(
                a.device == b.device and torch.equal(a, b) for a, b in zip(kept[0], weights)):
            return kept[1]
        # run in local_batch_size chunks (cache-sized on a CPU), kept in the transformer's batches
        out = torch.cat([enc.local_encoder(data.source[i : i + self.local_batch_size].to(self.device))
                         for i in range(0, len(data), self.local_batch_size)])
        outs = list(out.split(self.batch_size))
        self._local[key] = ([w.clone() for w in weights], outs)
        return outs
